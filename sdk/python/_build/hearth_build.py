"""A PEP 517 build backend in the source tree, with nothing to download: `pip install
./sdk/python` works offline (given nats-py and msgpack), on any Python >= 3.9. It builds one pure
wheel of `src/hearth_sandbox`, an editable wheel (`pip install -e`) and an sdist."""

import base64
import hashlib
import io
import os
import re
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "hearth_sandbox"
NAME = "hearth-sandbox"
REQUIRES = ["nats-py>=2.9", "msgpack>=1.0"]


def _version():
    with open(os.path.join(ROOT, "src", PACKAGE, "_version.py"), encoding="utf-8") as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def _metadata():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {NAME}",
        f"Version: {_version()}",
        "Summary: Python SDK for Hearth: warm microVM sandboxes for AI-agent executors, over NATS",
        "License: Apache-2.0",
        "Requires-Python: >=3.9",
        "Classifier: Typing :: Typed",
        "Classifier: Framework :: AsyncIO",
        "Classifier: Programming Language :: Python :: 3",
    ]
    lines += [f"Requires-Dist: {r}" for r in REQUIRES]
    lines += ["Description-Content-Type: text/markdown", "", readme]
    return "\n".join(lines)


def _dist_info():
    return f"{PACKAGE}-{_version()}.dist-info"


def _wheel(wheel_directory, files):
    """Writes a wheel of `files` ({archive name: bytes}) plus its dist-info."""
    name = f"{PACKAGE}-{_version()}-py3-none-any.whl"
    info = _dist_info()
    files = dict(files)
    files[f"{info}/METADATA"] = _metadata().encode()
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: hearth_build\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w", zipfile.ZIP_DEFLATED) as whl:
        for path, data in files.items():
            whl.writestr(path, data)
    return name


def _sources():
    src = os.path.join(ROOT, "src")
    for dirpath, dirnames, filenames in os.walk(os.path.join(src, PACKAGE)):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for filename in sorted(filenames):
            if filename.endswith((".py", ".typed")):
                path = os.path.join(dirpath, filename)
                yield os.path.relpath(path, src).replace(os.sep, "/"), path


def get_requires_for_build_wheel(config_settings=None):
    return []


get_requires_for_build_sdist = get_requires_for_build_editable = get_requires_for_build_wheel


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    files = {}
    for name, path in _sources():
        with open(path, "rb") as f:
            files[name] = f.read()
    return _wheel(wheel_directory, files)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _wheel(wheel_directory, {f"_{PACKAGE}.pth": (os.path.join(ROOT, "src") + "\n").encode()})


def build_sdist(sdist_directory, config_settings=None):
    base = f"{PACKAGE}-{_version()}"
    name = f"{base}.tar.gz"
    with tarfile.open(os.path.join(sdist_directory, name), "w:gz") as tar:
        for entry in ("pyproject.toml", "README.md", "_build/hearth_build.py", "src"):
            tar.add(os.path.join(ROOT, entry), f"{base}/{entry}",
                    filter=lambda t: None if "__pycache__" in t.name else t)
        pkg_info = _metadata().encode()
        member = tarfile.TarInfo(f"{base}/PKG-INFO")
        member.size = len(pkg_info)
        tar.addfile(member, io.BytesIO(pkg_info))
    return name
