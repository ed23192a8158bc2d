"""Files and folders a node writes on its clients' behalf.

- The job root (``--dest-path``, default ``<temp folder>/dpool-<uid>``) is
  this user's own folder, mode 0700: made so if missing, made 0700 if ours,
  refused if it is a symbolic link, not a folder, or owned by someone else.
  The same check applies to a ``dest_path`` folder inside it.
- Files sent by a client (``depends``, ``send_file``, ``dispy_job_depends``)
  are created without following a symbolic link, with their mode masked:
  never group- or world-writable, no set-user-id, set-group-id or sticky
  bit; the owner can always read and write them.
"""
import os
import stat
import tempfile

#: Bits of a sent file's mode that are kept (then owner read/write are added).
FILE_MODE_MASK = 0o755


def file_mode(mode: int) -> int:
    """The mode a sent file gets for the ``mode`` the client asked."""
    return (int(mode) & FILE_MODE_MASK) | 0o600


def default_job_root() -> str:
    return os.path.join(tempfile.gettempdir(), f"dpool-{os.getuid()}")


def private_dir(path: str) -> str:
    """Make ``path`` (and missing parents) a folder of this user, mode 0700.

    Raises PermissionError naming the owner if it belongs to someone else,
    NotADirectoryError if it is a symbolic link or not a folder.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return private_dir(path)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path} is a symbolic link or not a folder; dpool "
                                 f"needs a folder of its own there")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} is owned by uid {st.st_uid}, not by this node's "
                              f"user (uid {os.getuid()}): refusing to use it (someone else "
                              f"could read or change the jobs' files); remove it or choose "
                              f"another folder")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def write_private(path: str, data, mode: int) -> None:
    """Write ``data`` to ``path`` (never through a symbolic link) with
    :func:`file_mode` of ``mode``; missing folders are made 0700."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, file_mode(mode))
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
