"""The `photos` source: real photographs from package wheels, test crops from pixels no train crop touches,
and the whole pipeline on it (shard -> pretrain -> finetune -> report)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cluster.cli import main
from shards import photos
from shards.sources import open_source


def test_photos_source_ten_classes_fixed_and_splits_by_region():
    src = open_source("photos", None)
    assert src.name == "photos" and len(src.classes) == 10 and src.channels == 3
    assert src.counts == {s: n * 10 for s, n in photos.COUNTS.items()}
    for name in ("train", "test"):
        assert np.bincount(src.splits[name].labels, minlength=10).tolist() == [photos.COUNTS[name]] * 10
    assert (src.splits["unlabeled"].labels == -1).all()
    assert src.splits["train"].images.shape[1:] == (photos.CROP, photos.CROP, 3)

    pics = photos.photographs()
    where = photos.layout(pics)
    for name, w in where.items():
        train_cells, test_cells = set(w["cells"]["train"]), set(w["cells"]["test"])
        assert test_cells and train_cells and not train_cells & test_cells
        h, wd = pics[name].shape[:2]
        for split, boxes in w["boxes"].items():
            allowed = test_cells if split == "test" else train_cells
            for y, x, side in boxes:  # each crop lies wholly inside one cell of its own area
                assert side >= photos.MIN_SIDE and y + side <= h and x + side <= wd
                assert any(y0 <= y and y + side <= y1 and x0 <= x and x + side <= x1 for y0, y1, x0, x1 in allowed)
        # so no test pixel is in any train or unlabeled crop
        seen = np.zeros((h, wd), bool)
        for y, x, side in w["boxes"]["train"] + w["boxes"]["unlabeled"]:
            seen[y:y + side, x:x + side] = True
        assert not any(seen[y:y + side, x:x + side].any() for y, x, side in w["boxes"]["test"])

    again = photos.photos_source()  # one fixed seed: the same crops every time
    assert np.array_equal(again.splits["test"].images, src.splits["test"].images)


def test_photos_val_validates_on_unseen_train_cells_and_never_touches_the_test_cells():
    """`photos-val`: its "test" crops come from train cells of the real layout that none of its train or
    unlabeled crops touch, and no crop of it comes from a real test cell, so settings chosen on it never saw
    the benchmark's test pixels."""
    pics = photos.photographs()
    real, val = photos.layout(pics), photos.layout(pics, validation=True)
    for name in photos.CLASSES:
        real_test, real_train = set(real[name]["cells"]["test"]), set(real[name]["cells"]["train"])
        val_test, val_train = set(val[name]["cells"]["test"]), set(val[name]["cells"]["train"])
        assert val_test and val_train and not val_test & val_train
        assert val_test | val_train == real_train and not (val_test | val_train) & real_test
        h, wd = pics[name].shape[:2]
        seen, test_px = np.zeros((h, wd), bool), np.zeros((h, wd), bool)
        for y, x, side in val[name]["boxes"]["train"] + val[name]["boxes"]["unlabeled"]:
            seen[y:y + side, x:x + side] = True
        for y0, y1, x0, x1 in real_test:
            test_px[y0:y1, x0:x1] = True
        assert not (seen & test_px).any()
        for y, x, side in val[name]["boxes"]["test"]:
            assert not seen[y:y + side, x:x + side].any() and not test_px[y:y + side, x:x + side].any()
    src = open_source("photos-val", None)
    assert src.name == "photos-val" and src.counts == {s: n * 10 for s, n in photos.COUNTS.items()}
    assert not np.array_equal(src.splits["test"].images, photos.photos_source().splits["test"].images)


def test_more_unlabeled_crops_keep_every_other_crop_and_never_touch_a_test_cell(tmp_path, capsys):
    """--photos-unlabeled N: N unlabeled crops per class, the benchmark's own 60 first and unchanged, the
    train and test crops unchanged, the extra ones from train cells only (of the validation layout too)."""
    base, more = photos.photos_source(), photos.photos_source(unlabeled=75)
    assert more.counts == {"train": 1000, "test": 400, "unlabeled": 750}
    for split in ("train", "test"):
        assert np.array_equal(more.splits[split].images, base.splits[split].images)
    ours = more.splits["unlabeled"].images.reshape(10, 75, *base.splits["unlabeled"].images.shape[1:])
    assert np.array_equal(ours[:, :60], base.splits["unlabeled"].images.reshape(ours[:, :60].shape))
    pics = photos.photographs()
    for validation in (False, True):
        real, where = photos.layout(pics), photos.layout(pics, validation, unlabeled=75)
        for name, w in where.items():
            boxes = w["boxes"]["unlabeled"]
            assert len(boxes) == 75 and len(set(boxes[60:])) > 1
            train_cells = w["cells"]["train"]
            for y, x, side in boxes[60:]:
                assert any(y0 <= y and y + side <= y1 and x0 <= x and x + side <= x1 for y0, y1, x0, x1 in train_cells)
            test_px = np.zeros(pics[name].shape[:2], bool)
            for y0, y1, x0, x1 in real[name]["cells"]["test"] + (w["cells"]["test"] if validation else []):
                test_px[y0:y1, x0:x1] = True
            assert not any(test_px[y:y + side, x:x + side].any() for y, x, side in boxes)
    # through the command, and refused in one line where it means nothing
    out = tmp_path / "shards"
    assert main(["shard", "photos", "--out", str(out), "--image-size", "16", "--photos-unlabeled", "70"]) == 0
    assert json.loads((out / "manifest.json").read_text())["splits"]["unlabeled"]["count"] == 700
    for source, n in (("photos", "10"), ("digits", "100")):
        assert main(["shard", source, "--out", str(tmp_path / f"bad-{source}"), "--photos-unlabeled", n]) == 2
        err = capsys.readouterr().err.strip()
        assert "--photos-unlabeled" in err and "\n" not in err and not (tmp_path / f"bad-{source}").exists()


def test_shard_photos_cli_needs_no_input(tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["shard", "photos", "--out", str(out), "--image-size", "16"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"] == "photos" and m["image_size"] == 16 and m["classes"][0] == "china"
    assert {k: v["count"] for k, v in m["splits"].items()} == {"train": 1000, "test": 400, "unlabeled": 600}


@pytest.mark.slow
def test_photos_pipeline_end_to_end(tmp_path, capsys, monkeypatch):
    """configs/photos.yaml through every stage on a tiny budget: the report holds every method's rows."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    run_dir = tmp_path / "run"
    argv = ["pipeline", "--local", "--config", "configs/photos.yaml", f"output_dir={run_dir}",
            f"data.shards={tmp_path / 'shards'}", "data.image_size=16", "pretrain.epochs=1",
            "pretrain.knn_every=0", "model.timm_kwargs={channels: [8, 16, 32, 64]}", "model.proj_hidden_dim=64",
            "model.proj_output_dim=32", "trainer.torch_threads=1", "finetune.num_seeds=2", "finetune.epochs=1",
            "finetune.full_epochs=1", "finetune.semi_epochs=1", "wandb.enabled=false"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["source"] == "photos"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["dataset"] == "photos" and report["semi_method"]
    rows = {(r["method"], r["label_fraction"]): r for r in report["results"]}
    expected = {(m, f) for m in ("pixels", "scratch", "knn", "linear", "finetune", "semi") for f in (0.01, 0.1)}
    expected |= {(m, 1.0) for m in ("pixels", "linear", "scratch")}
    assert set(rows) == expected
    assert rows[("semi", 0.01)]["seeds"] == 2 and rows[("semi", 0.01)]["labels"] == 10
    assert rows[("finetune", 0.1)]["labels"] == 100
    # all labels: scratch on finetune.full_fraction_seeds (5 in the photo config) seeds, the fits without a seed once
    assert rows[("scratch", 1.0)]["seeds"] == len(rows[("scratch", 1.0)]["accuracies"]) == 5
    assert rows[("pixels", 1.0)]["seeds"] == rows[("linear", 1.0)]["seeds"] == 1
    assert (run_dir / "report.md").is_file() and (run_dir / "label_efficiency.png").is_file()


def test_bench_semi_collects_and_writes_the_table(tmp_path):
    """bench.semi: finetune/semi rows from report.json files, finetune once per encoder, into README markers."""
    from bench import semi

    def report(d: Path, method: str, accs: list[float], heldout: list | None = None) -> str:
        d.mkdir()
        rows = [{"method": m, "label_fraction": 0.1, "labels": 100, "accuracy_mean": float(np.mean(a)),
                 "accuracy_std": float(np.std(a, ddof=1)), "seeds": len(a), "accuracies": a, "compute_s": 12.0}
                for m, a in (("finetune", [0.5, 0.6]), ("semi", accs), ("pixels", [0.3, 0.3]))]
        (d / "report.json").write_text(json.dumps({"dataset": "photos", "semi_method": method, "results": rows,
                                                   "semi_heldout": heldout}))
        return str(d)

    held = [{"label_fraction": 0.1, "seeds": 2, "images": 900, "teacher": 0.6, "finetune": 0.55, "semi": 0.72,
             "by_seed": [{"seed_index": 0, "teacher": 0.6, "finetune": 0.5, "semi": 0.7},
                         {"seed_index": 1, "teacher": 0.6, "finetune": 0.6, "semi": 0.74}]}]
    runs = [report(tmp_path / "a", "distill", [0.7, 0.8], held), report(tmp_path / "b", "fixmatch", [0.4, 0.5]) + "=fm"]
    out = tmp_path / "semi.json"
    assert semi.main(["collect", *runs, "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert [(r["method"], r["label"]) for r in got["rows"]] == [
        ("finetune", "finetune"), ("distill", "distill"), ("finetune", "finetune"), ("fixmatch", "fm")]
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- figures:semi-photos -->\n<!-- /figures:semi-photos -->\n")
    assert semi.main(["figures", str(out), "--section", "semi-photos", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.count("| `finetune` |") == 1  # the same fine-tuning figures appear once
    # held-out: the accuracy on train images outside the labeled subsets, where a run measured it
    assert "| `finetune` | 55.0 ± 7.1 (n=2) | 55.0 | 12 |" in text
    assert "| `distill` | 75.0 ± 7.1 (n=2) | 72.0 | 12 |" in text and "| `fm` | 45.0 ± 7.1 (n=2) |  | 12 |" in text
    # finetune on two encoders (different figures): one row each, named by its run
    other = report(tmp_path / "c", "distill", [0.9, 0.9], None)
    json_c = json.loads((tmp_path / "c" / "report.json").read_text())
    json_c["results"][0]["accuracies"] = [0.8, 0.8]
    (tmp_path / "c" / "report.json").write_text(json.dumps(json_c))
    assert semi.main(["collect", runs[0], other + "=d2", "--out", str(out)]) == 0
    assert semi.main(["figures", str(out), "--section", "semi-photos", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| `finetune` (a) | 55.0 ± 7.1 (n=2) |" in text and "| `finetune` (c) | 80.0 ± 0.0 (n=2) |" in text
    assert "| `distill` |" in text and "| `d2` |" in text
    # --seeds N: every run on its first N subsets only (runs of different lengths compared on the same subsets)
    assert semi.main(["collect", *runs, "--seeds", "1", "--out", str(out)]) == 0
    first = {r["label"]: r for r in json.loads(out.read_text())["rows"]}
    assert first["distill"]["accuracies"] == [0.7] and first["distill"]["seeds"] == 1
    assert first["distill"]["heldout"] == pytest.approx(0.7) and first["distill"]["compute_s"] == 6.0
    assert first["fm"]["heldout"] is None
    # a run whose encoder kept its metrics.jsonl: the epochs' seconds and the encoder's kNN join the table
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "epoch_s": 100.0}) + "\n"
                                                    + json.dumps({"epoch": 2, "epoch_s": 23.4}) + "\n")
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    (tmp_path / "a" / "report.json").write_text(json.dumps({**rep, "encoder_knn_acc": 0.9512,
                                                            "encoder": str(tmp_path / "enc")}))
    assert semi.main(["collect", *runs, "--out", str(out)]) == 0
    assert semi.main(["figures", str(out), "--section", "semi-photos", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| pretrain (s) | kNN (test, monitor) |" in text
    assert "| `distill` | 75.0 ± 7.1 (n=2) | 72.0 | 12 | 123 | 0.951 |" in text
    assert "| `fm` | 45.0 ± 7.1 (n=2) |  | 12 |  |  |" in text
