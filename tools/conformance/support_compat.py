"""What a newer CPython's test_concurrent_futures package needs from
``test.support`` that 3.11's lacks, added to 3.11's (imported by the
package's copy, so in the workers too).  Only no-op or 3.11-true values:
the GIL is enabled, no thread sanitizer."""
import functools

from test import support

if not hasattr(support, "Py_GIL_DISABLED"):
    support.Py_GIL_DISABLED = False
if not hasattr(support, "requires_gil_enabled"):
    support.requires_gil_enabled = lambda msg="": (lambda f: f)
if "thread" not in support.check_sanitizer.__kwdefaults__:
    def _without_thread(f, none):
        """``f`` taking (and dropping) ``thread=``: 3.11 has no thread
        sanitizer; asked about that alone, ``none``."""
        @functools.wraps(f)
        def wrapper(*args, thread=False, **kwargs):
            if not any(kwargs.values()):
                return none
            return f(*args, **kwargs)
        return wrapper

    support.check_sanitizer = _without_thread(support.check_sanitizer, False)
    support.skip_if_sanitizer = _without_thread(support.skip_if_sanitizer, lambda f: f)
