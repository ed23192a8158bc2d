"""dispy's ``depends``: what goes to each node before its first job.

- a file path: the file, saved in the job folder under the same relative
  path if it is under the client's working directory, else under its name;
- a module: its ``.py`` file, saved so that ``import`` finds it (the job
  folder is on the worker's ``sys.path``);
- a function or class (or an instance, meaning its class): sent by pickle
  and put in the computation's globals under its name.

Errors (a missing file, an object that is none of these, a module without a
source file) raise here, in the user's thread, when the cluster is created
or the job submitted.
"""
import os
import stat

from .. import protocol as P

#: (name relative to the job folder, permission bits, contents)
FileEntry = tuple


def file_entry(path, cwd=None):
    """A file for the node: FileNotFoundError if it is not a readable file."""
    cwd = cwd or os.getcwd()
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"dependency {path!r} is not a file ({full} does not exist "
                                f"or is not a regular file)")
    if full.startswith(cwd.rstrip(os.sep) + os.sep):
        name = os.path.relpath(full, cwd)
    else:
        name = os.path.basename(full)
    with open(full, "rb") as f:
        data = f.read()
    return name.replace(os.sep, "/"), stat.S_IMODE(os.stat(full).st_mode), data


def module_entry(module):
    source = getattr(module, "__file__", None)
    if not source or not source.endswith((".py", ".pyc")):
        raise TypeError(f"dependency module {module.__name__!r} has no Python source file "
                        f"to send (install it on the nodes instead)")
    if source.endswith(".pyc"):
        source = source[:-1]
    parts = module.__name__.split(".")
    if os.path.basename(source) == "__init__.py":
        name = "/".join(parts) + "/__init__.py"
    else:
        name = "/".join(parts[:-1] + [os.path.basename(source)])
    with open(source, "rb") as f:
        data = f.read()
    return name, 0o644, data


def collect(depends, cwd=None):
    """Split ``depends`` into ([FileEntry], {name: function or class})."""
    import inspect  # (not with the module: a pool's start-up imports it, issue 13)

    if isinstance(depends, (str, bytes)) or not isinstance(depends, (list, tuple)):
        raise TypeError("depends must be a list (of file paths, modules, functions, classes)")
    files, names = [], {}
    for dep in depends:
        if isinstance(dep, (str, os.PathLike)):
            files.append(file_entry(os.fspath(dep), cwd))
        elif inspect.ismodule(dep):
            files.append(module_entry(dep))
        elif inspect.isfunction(dep) or inspect.isclass(dep) or inspect.isbuiltin(dep):
            names[dep.__name__] = dep
        elif callable(getattr(dep, "func", None)):  # functools.partial: its function
            names[dep.func.__name__] = dep.func
        elif hasattr(dep, "__class__") and hasattr(dep, "__module__") \
                and not isinstance(dep, (int, float, bytes, list, tuple, dict, set)):
            names[type(dep).__name__] = type(dep)
        else:
            raise TypeError(f"invalid dependency {dep!r}: give a file path, a module, a "
                            f"function or a class")
    return files, names


def file_messages(files):
    """FILE messages (sent after SESSION) writing ``files`` ([FileEntry]) into
    the session's folder on a node."""
    return [[P.encode(P.File, None, name, mode), data] for name, mode, data in files]


def code_files(depends):
    """The Executor's and Pool's ``depends``: modules and file paths only
    (functions and classes travel with the job that uses them)."""
    if not depends:
        return []
    files, names = collect(list(depends) if isinstance(depends, tuple) else depends)
    if names:
        raise TypeError(f"depends takes modules and file paths; {', '.join(names)} "
                        f"travel with the jobs that use them (give their module instead)")
    return files
