"""examples/gpu/kit_stream.py: the device kit's files cut into parts and rebuilt from them, in any order of arrival."""

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "gpu"))

import kit_stream  # noqa: E402


@pytest.fixture
def payload(tmp_path):
    """Three groups of files of awkward sizes (empty, smaller and larger than a part), random bytes."""
    generator = __import__("random").Random(0)
    sizes = {"c1/a.whl": 1000, "c1/b.whl": 0, "d2/av.whl": 5003, "gguf/model.gguf": 12_345}
    root = tmp_path / "payload"
    for name, size in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(bytes(generator.getrandbits(8) for _ in range(size)))
    return root


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_parts_are_equal_fit_the_budget_and_rebuild_every_file_byte_equal(payload, tmp_path):
    folders = kit_stream.split(payload, tmp_path / "kit", 4096, ["c1", "d2", "gguf"])
    sizes = [(folder / f"part{i:02d}").stat().st_size for i, folder in enumerate(folders)]
    assert len(folders) == 5 and max(sizes) <= 4096 and sum(sizes) == 1000 + 5003 + 12_345
    assert max(sizes) - min(sizes) <= 4  # equal parts, not four full ones and a crumb
    remote = tmp_path / "remote"
    for folder in folders:
        kit_stream.receive(folder, remote)
    for name in ("c1/a.whl", "c1/b.whl", "d2/av.whl", "gguf/model.gguf"):
        assert digest(remote / name) == digest(payload / name), name


def test_files_are_rebuilt_as_soon_as_their_bytes_arrive_and_a_gap_holds_the_rest_back(payload, tmp_path):
    folders = kit_stream.split(payload, tmp_path / "kit", 4096, ["c1", "d2", "gguf"])
    remote = tmp_path / "remote"
    missing = kit_stream.receive(folders[0], remote)
    assert (remote / "c1/a.whl").is_file() and (remote / "c1/b.whl").is_file()  # the wheels first
    assert missing == ["d2/av.whl", "gguf/model.gguf"]
    # Part 3 before part 2: nothing after the gap is used yet, and nothing is rebuilt from it.
    assert kit_stream.receive(folders[2], remote) == ["d2/av.whl", "gguf/model.gguf"]
    assert not (remote / "d2").exists()
    assert kit_stream.receive(folders[1], remote) == ["gguf/model.gguf"]
    assert digest(remote / "d2/av.whl") == digest(payload / "d2/av.whl")


def test_a_corrupt_part_is_refused_naming_the_file(payload, tmp_path):
    folders = kit_stream.split(payload, tmp_path / "kit", 4096, ["c1", "d2", "gguf"])
    part = folders[1] / "part01"
    data = bytearray(part.read_bytes())
    data[10] ^= 0xFF
    part.write_bytes(bytes(data))
    remote = tmp_path / "remote"
    kit_stream.receive(folders[0], remote)
    with pytest.raises(ValueError, match=r"d2/av.whl: .*sha256"):
        kit_stream.receive(folders[1], remote)
    assert not (remote / "d2/av.whl").exists()  # no half-checked file is left where the installer would look
