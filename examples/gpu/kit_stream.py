"""Carry a set of files to the lent GPU machine in parts that each fit one call (`device.sh kit` and `receive`).

A call carries at most 64 MiB, the working tree included, so the kit (wheels, the Whisper encoder, the SmolLM2 GGUF)
travels as one byte stream: the files in the order they are needed, concatenated and cut into equal parts. Every part
holds the manifest (each file's offset, size and sha256). `receive` rebuilds each file whose bytes have all arrived,
from the parts that follow on from the stream's start without a gap, and checks it; so the first parts' wheels are
installed while the last parts are still on their way.

    python examples/gpu/kit_stream.py split PAYLOAD OUT --part-bytes N GROUP ...   # here: OUT/p1 .. OUT/pK
    python examples/gpu/kit_stream.py receive PART_DIR KIT                        # there: files -> KIT/GROUP/...
"""

import argparse
import hashlib
import sys
from pathlib import Path

MANIFEST = "manifest.tsv"


def split(payload: Path, out: Path, part_bytes: int, groups: list[str]) -> list[Path]:
    """Write the files of `payload`'s subfolders `groups`, in that order, as equal parts OUT/p1 .. OUT/pK of at most
    `part_bytes` each (each with the manifest). Returns the part folders."""
    files = [f for group in groups for f in sorted((payload / group).iterdir()) if f.is_file()]
    if not files:
        raise ValueError(f"{payload}: no files in {groups}")
    contents = [f.read_bytes() for f in files]  # each file read once: for its digest and for the stream
    rows, total = [], 0
    for f, data in zip(files, contents):
        rows.append(f"{total}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\t{f.relative_to(payload)}")
        total += len(data)
    count = -(-total // part_bytes)
    size = -(-total // count)  # equal parts: the last one is no smaller than it needs to be
    manifest = f"{size}\n" + "\n".join(rows) + "\n"
    stream = b"".join(contents)
    folders = []
    for index in range(count):
        folder = out / f"p{index + 1}"
        folder.mkdir(parents=True)
        (folder / f"part{index:02d}").write_bytes(stream[index * size : (index + 1) * size])
        (folder / MANIFEST).write_text(manifest)
        folders.append(folder)
    return folders


def receive(part_dir: Path, kit: Path) -> list[str]:
    """Add the part in `part_dir` to KIT/parts, and write every file whose bytes have all arrived to KIT/<its path>,
    checked by sha256. Returns the files still missing."""
    parts = kit / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    for f in part_dir.iterdir():
        if f.name == MANIFEST or f.name.startswith("part"):
            (parts / f.name).write_bytes(f.read_bytes())
    size_line, *rows = (parts / MANIFEST).read_text().splitlines()
    part_size = int(size_line)

    def part(index: int) -> Path:
        return parts / f"part{index:02d}"

    arrived = 0  # the stream's bytes present from its start, without a gap
    while part(arrived // part_size).is_file():
        length = part(arrived // part_size).stat().st_size
        arrived += length
        if length < part_size:  # the last part
            break

    def read(offset: int, size: int) -> bytes:
        out = bytearray()
        while size:
            index, within = divmod(offset, part_size)
            with open(part(index), "rb") as f:
                f.seek(within)
                chunk = f.read(min(size, part_size - within))
            out += chunk
            offset, size = offset + len(chunk), size - len(chunk)
        return bytes(out)

    missing = []
    for row in rows:
        offset, size, digest, name = row.split("\t")
        target = kit / name
        if target.is_file():
            continue
        if int(offset) + int(size) > arrived:
            missing.append(name)
            continue
        data = read(int(offset), int(size))
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"{name}: its bytes in {parts} do not match the manifest's sha256 (a corrupt part)")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(data)
        partial.replace(target)  # atomic: a file that exists is whole
        print("complete:", name)
    print(f"{arrived / 1e6:.1f} MB arrived; still missing: {', '.join(missing) or 'nothing'}")
    return missing


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("split")
    s.add_argument("payload", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("groups", nargs="+")
    s.add_argument("--part-bytes", type=int, required=True)
    r = commands.add_parser("receive")
    r.add_argument("part_dir", type=Path)
    r.add_argument("kit", type=Path)
    args = parser.parse_args(argv)
    if args.command == "split":
        folders = split(args.payload, args.out, args.part_bytes, args.groups)
        total = sum(f.stat().st_size for folder in folders for f in folder.glob("part*"))
        print(f"{total / 1e6:.1f} MB in {len(folders)} parts: {' '.join(map(str, folders))}")
    else:
        try:
            receive(args.part_dir, args.kit)
        except ValueError as error:
            sys.exit(str(error))


if __name__ == "__main__":
    main()
