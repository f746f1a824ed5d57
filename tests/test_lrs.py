"""LRS2/LRS3 loading in both layouts (trees built from the synthetic corpus) and the max-frames batch sampler."""

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")
pytest.importorskip("av")
pytest.importorskip("decord")

sys.path.insert(0, str(Path(__file__).parent))
import make_trees  # noqa: E402

from modeling_llama_avsr.data import MaxFramesBatchSampler, load_lrs, read_audio, read_video  # noqa: E402


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("lrs")
    corpus = make_trees.tiny_corpus(base / "corpus")
    return {
        "corpus": corpus,
        "lrs3_raw": (base / "lrs3_raw", make_trees.make_raw_lrs3(corpus, base / "lrs3_raw",
                                                                  {"trainval": 3, "test": 2, "pretrain": 1})),
        "lrs2_raw": (base / "lrs2_raw", make_trees.make_raw_lrs2(corpus, base / "lrs2_raw",
                                                                  {"train": 2, "val": 1, "test": 2, "pretrain": 1})),
        "lrs3_auto": (base / "lrs3_auto", make_trees.make_auto_avsr(corpus, base / "lrs3_auto", "lrs3",
                                                                     {"train": 3, "test": 2})),
        "lrs2_auto": (base / "lrs2_auto", make_trees.make_auto_avsr(corpus, base / "lrs2_auto", "lrs2",
                                                                     {"train": 2, "test": 3}, with_text_column=False)),
    }


def _texts(rows):
    return sorted(",".join(row[4:]) for row in rows)


@pytest.mark.parametrize("tree,dataset,split,official", [
    ("lrs3_raw", "lrs3", "train", "trainval"), ("lrs3_raw", "lrs3", "test", "test"),
    ("lrs3_raw", "lrs3", "pretrain", "pretrain"),
    ("lrs2_raw", "lrs2", "train", "train"), ("lrs2_raw", "lrs2", "validation", "val"),
    ("lrs2_raw", "lrs2", "test", "test"), ("lrs2_raw", "lrs2", "pretrain", "pretrain"),
    ("lrs3_auto", "lrs3", "train", "train"), ("lrs3_auto", "lrs3", "test", "test"),
    ("lrs2_auto", "lrs2", "train", "train"), ("lrs2_auto", "lrs2", "test", "test"),
])
def test_counts_transcripts_and_shapes(trees, tree, dataset, split, official):
    root, used = trees[tree]
    data, report = load_lrs(root, dataset, split, return_report=True)  # layout="auto" tells the two apart
    assert report.layout == ("raw" if tree.endswith("raw") else "auto_avsr")
    assert len(data) == len(used[official]) == report.kept and report.problems == 0
    assert sorted(data["text"]) == _texts(used[official])  # lower-cased in both layouts
    row = data[0]
    assert set(row) == {"id", "dataset", "audio_path", "video_path", "text", "num_frames", "duration"}
    frames, audio = read_video(row["video_path"]), read_audio(row["audio_path"])
    size = 224 if tree.endswith("raw") else 96
    assert frames.shape == (row["num_frames"], size, size) and frames.dtype == np.uint8
    assert row["duration"] == pytest.approx(row["num_frames"] / 25)
    assert audio.ndim == 1 and abs(len(audio) / 16000 - row["duration"]) < 0.1  # AAC adds a little padding


def test_raw_and_auto_avsr_agree(trees):
    raw, _ = trees["lrs3_raw"]
    auto, _ = trees["lrs3_auto"]
    a, b = load_lrs(raw, "lrs3", "test", layout="raw"), load_lrs(auto, "lrs3", "test", layout="auto_avsr")
    assert sorted(zip(a["text"], a["num_frames"])) == sorted(zip(b["text"], b["num_frames"]))


def test_missing_and_duplicate_files_are_reported_not_fatal(trees, tmp_path, caplog):
    import shutil

    root = tmp_path / "lrs2"
    shutil.copytree(trees["lrs2_raw"][0], root)
    ids = (root / "train.txt").read_text().split()
    (root / "train.txt").write_text("\n".join(ids + [ids[0], "123/00042"]) + "\n")  # a duplicate, a missing clip
    (root / "mvlrs_v1" / "main" / f"{ids[1]}.txt").unlink()  # a clip without its transcript
    with caplog.at_level(logging.WARNING):
        data, report = load_lrs(root, "lrs2", "train", return_report=True)
    assert len(data) == 1 and data["id"] == [ids[0]]
    assert report.duplicates == [ids[0]] and len(report.missing) == 3  # mp4 + txt of 123/00042, txt of ids[1]
    assert "2 listed" not in report.summary() and "duplicates" in caplog.text


def test_bad_transcripts_and_headers_are_reported(trees, tmp_path):
    import shutil

    root = tmp_path / "lrs3"
    shutil.copytree(trees["lrs3_raw"][0], root)
    clips = sorted((root / "trainval").glob("*/*.mp4"))
    clips[0].with_suffix(".txt").write_text("Text:  HELLO\x00WORLD\nConf:  4\n")
    clips[1].write_bytes(b"not a video at all")
    data, report = load_lrs(root, "lrs3", "trainval", return_report=True)
    assert len(data) == 1 and len(report.unreadable) == 2
    assert any(str(clips[0].with_suffix(".txt")) in u and "U+0000" in u for u in report.unreadable)
    assert any(str(clips[1]) in u for u in report.unreadable)


def test_max_duration_filter_and_streaming(trees):
    root, used = trees["lrs3_raw"]
    full = load_lrs(root, "lrs3", "trainval")
    limit = float(np.median(full["duration"]))
    short, report = load_lrs(root, "lrs3", "trainval", max_duration=limit, return_report=True)
    assert len(short) == sum(d <= limit for d in full["duration"]) and len(report.too_long) == len(full) - len(short)
    streamed = list(load_lrs(root, "lrs3", "trainval", streaming=True, num_shards=2))
    assert sorted(r["id"] for r in streamed) == sorted(full["id"])
    assert {r["id"]: r["num_frames"] for r in streamed} == dict(zip(full["id"], full["num_frames"]))
    streamed_short = list(load_lrs(root, "lrs3", "trainval", streaming=True, max_duration=limit))
    assert sorted(r["id"] for r in streamed_short) == sorted(short["id"])


def test_unknown_split_and_layout_errors(trees):
    root, _ = trees["lrs3_raw"]
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_lrs(root, "lrs3", "validation")
    with pytest.raises(FileNotFoundError, match="no label csv"):
        load_lrs(trees["lrs3_auto"][0], "lrs3", "pretrain")
    with pytest.raises(ValueError, match="layout"):
        load_lrs(root, "lrs3", "test", layout="kaldi")


# ---- MaxFramesBatchSampler -------------------------------------------------------------------------------------------

LENGTHS = np.random.default_rng(0).integers(20, 400, size=301)


def _cost(batch, lengths=LENGTHS):
    return len(batch) * max(lengths[i] for i in batch)


def test_max_frames_batches_cover_everything_within_budget():
    sampler = MaxFramesBatchSampler(LENGTHS, max_frames=1200, bucket_frames=5, seed=1)
    counts = set()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        counts.add(len(batches))
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
        assert all(_cost(b) <= 1200 for b in batches)
    assert len(counts) == 1  # Trainer computes its step count once
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert first != list(sampler)  # a new order every epoch
    capped = MaxFramesBatchSampler(LENGTHS, max_frames=100_000, max_batch_size=8)
    assert max(len(b) for b in capped) == 8


def test_max_frames_oversized_clip_gets_its_own_batch(caplog):
    with caplog.at_level(logging.WARNING):
        batches = list(MaxFramesBatchSampler([10, 10, 500], max_frames=100))
    assert [2] in batches and "longer than max_frames" in caplog.text


@pytest.mark.parametrize("world", [2, 3])
def test_max_frames_several_processes(world):
    from accelerate.data_loader import BatchSamplerShard

    sampler = MaxFramesBatchSampler(LENGTHS, max_frames=1500, num_replicas=world, seed=3)
    per_rank = [list(BatchSamplerShard(sampler, num_processes=world, process_index=r)) for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1 and len(per_rank[0]) == len(sampler) // world
    for r in range(world):  # the rank-aware mode (plain torch.distributed) yields the same batches
        assert per_rank[r] == list(MaxFramesBatchSampler(LENGTHS, 1500, num_replicas=world, rank=r, seed=3))
    seen = [i for batches in per_rank for b in batches for i in b]
    assert set(seen) == set(range(len(LENGTHS)))
    assert len(seen) - len(set(seen)) <= max(len(b) for batches in per_rank for b in batches) * (world - 1)
    # the batches of one step cost about the same on every rank
    for step in zip(*per_rank):
        costs = [_cost(b) for b in step]
        assert max(costs) - min(costs) <= 400
    totals = [sum(_cost(b) for b in batches) for batches in per_rank]
    assert max(totals) / min(totals) < 1.05


def test_max_frames_with_trainer(tmp_path):
    """The AVSRTrainer change proposed in the report, on a plain Trainer: every clip once per epoch, batches within
    budget, the step count Trainer planned."""
    import datasets
    import torch
    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainingArguments

    lengths = LENGTHS[:60].tolist()
    data = datasets.Dataset.from_dict({"index": list(range(60)), "num_frames": lengths})
    seen = []

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, index, frames):
            seen.append(index.tolist())
            return {"loss": ((self.weight - frames.float().mean() / 1000) ** 2).sum()}

    def collate(rows):
        return {"index": torch.tensor([r["index"] for r in rows]), "frames": torch.tensor([r["num_frames"] for r in rows])}

    class MaxFramesTrainer(Trainer):
        def get_train_dataloader(self):
            sampler = MaxFramesBatchSampler(self.train_dataset["num_frames"], 600, num_replicas=self.args.world_size,
                                            seed=self.args.seed)
            loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                                num_workers=self.args.dataloader_num_workers)
            return self.accelerator.prepare(loader)

    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, report_to="none", use_cpu=True,
                             remove_unused_columns=False, save_strategy="no", logging_strategy="no",
                             learning_rate=1e-3)
    trainer = MaxFramesTrainer(model=Model(), args=args, train_dataset=data, data_collator=collate)
    planned = len(trainer.get_train_dataloader())
    result = trainer.train()
    assert result.global_step == 2 * planned == len(seen)
    for epoch in (seen[:planned], seen[planned:]):
        assert sorted(i for b in epoch for i in b) == list(range(60))
        assert all(len(b) * max(lengths[i] for i in b) <= 600 for b in epoch)
