"""Progress bars (tqdm) for long work; off unless asked for.

Two ways in:

- ``progress=True`` on dpool's maps: ``Executor.map``, ``Pool.map``,
  ``starmap``, ``map_async``, ``starmap_async``, ``imap`` and
  ``imap_unordered``.  The bar counts items (not chunks); a dict instead of
  ``True`` is passed to ``tqdm`` as options (``{"desc": "fit"}``).
- :func:`progress` around futures or ``DispyJob``\\ s, an ``as_completed``
  loop with a bar::

      for future in dpool.progress(futures):     # concurrent.futures.Future
          print(future.result())
      for job in dpool.progress(jobs):           # JobCluster's DispyJobs
          print(job.id, job.result)

  Around anything else (``pool.imap(...)``, a plain iterable) it is
  ``tqdm(iterable)``.

Needs tqdm (``pip install 'dpool[ecosystem]'``); asking for a bar without it
raises ImportError saying so.
"""
import concurrent.futures as _cf
import itertools
import threading

__all__ = ["progress"]


def make_bar(option, total=None, **defaults):
    """A tqdm bar for ``progress=option`` (True or a dict of tqdm options),
    or None when ``option`` is false."""
    if not option:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("progress bars need tqdm: pip install tqdm "
                          "(or pip install 'dpool[ecosystem]')") from None
    options = dict(defaults, total=total)
    if isinstance(option, dict):
        options.update(option)
    elif option is not True:
        raise TypeError(f"progress must be True, False or a dict of tqdm options, "
                        f"not {option!r}")
    return tqdm(**options)


def track(bar, futures, sizes):
    """Advance ``bar`` by ``sizes[i]`` when ``futures[i]`` ends (however it
    ends: done, failed or cancelled); close it after the last one."""
    if bar is None:
        return
    if bar.total is None:
        bar.total = sum(sizes)
        bar.refresh()
    left = [len(futures)]
    lock = threading.Lock()

    def done(size):
        def callback(_future):
            bar.update(size)
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                bar.close()
        return callback

    if not futures:
        bar.close()
    for future, size in zip(futures, sizes):
        future.add_done_callback(done(size))


def progress(iterable, total=None, **tqdm_options):
    """Iterate with a progress bar.

    Futures (``concurrent.futures.Future``) and ``DispyJob``\\ s are yielded
    as they finish (like ``concurrent.futures.as_completed``), whatever
    their order in ``iterable``; anything else is passed through in order.
    """
    iterator = iter(iterable)
    first = next(iterator, _EMPTY)
    if first is _EMPTY:
        return iter(())
    items = itertools.chain([first], iterator)
    if isinstance(first, _cf.Future) or _is_dispy_job(first):
        return _as_completed(list(items), tqdm_options)
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return _passthrough(items, make_bar(tqdm_options or True, total))


_EMPTY = object()


def _is_dispy_job(obj):
    return hasattr(obj, "finish") and hasattr(obj, "_job")


def _passthrough(items, bar):
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


def _as_completed(items, options):
    futures = {_future_of(item): item for item in items}
    bar = make_bar(options or True, len(futures), unit="job")
    try:
        for future in _cf.as_completed(futures):
            item = futures[future]
            if item is not future:  # a DispyJob: its fields are set just after
                item.finish.wait()
            bar.update(1)
            yield item
    finally:
        bar.close()


def _future_of(item):
    if isinstance(item, _cf.Future):
        return item
    core = item.core_job
    if core is not None:
        return core.future
    if item.is_done():  # finished: its core job let go of
        done = _cf.Future()
        done.set_result(None)
        return done
    raise ValueError(f"job {item.id} was never submitted")
