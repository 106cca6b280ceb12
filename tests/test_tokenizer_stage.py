"""The tokenizer stage on an ML-100K slice (100 users) with fake sasrec artifacts: training,
export and round trip of the SCID map, YAML swaps, data errors, the text encoder cache."""

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from callbacks.loss_schedule import TwoPhaseLossSchedule
from datamodules.schema import DataError
from datamodules.tokenizer_data import TokenizerDataModule, neighbour_smoothed
from lightning_modules.components.artifacts import atomic_torch_save, mark_stage_complete
from lightning_modules.components.residual_kmeans import ResidualKMeans
from lightning_modules.components.rqvae import RQVAE
from lightning_modules.components.scid_map import load_scid_map
from lightning_modules.components.text_encoder import TextEncoder
from lightning_modules.dual_tokenizer import DualTokenizer

ROOT = Path(__file__).resolve().parents[1]
USERS, ITEMS, COLLAB_DIM, TEXT_DIM = 100, 1682, 16, 24


class HashTextEncoder(TextEncoder):
    """Deterministic stand-in for the sentence encoder: a unit vector seeded by each text's
    hash (texts that are equal get equal vectors), so tests need not load MiniLM."""

    @property
    def name(self) -> str:
        return "hash-encoder"

    def encode(self, texts: list[str], desc: str = "") -> torch.Tensor:
        out = torch.empty(len(texts), TEXT_DIM)
        for i, text in enumerate(texts):
            seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
            out[i] = torch.randn(TEXT_DIM, generator=torch.Generator().manual_seed(seed))
        return torch.nn.functional.normalize(out, dim=1)


def fake_sasrec(run_dir: Path, num_users: int = USERS, dataset: str = "ml-100k",
                item_rows: int = ITEMS) -> Path:
    """A finished 'sasrec' stage with random embeddings."""
    g = torch.Generator().manual_seed(0)
    atomic_torch_save(torch.randn(item_rows, COLLAB_DIM, generator=g),
                      run_dir / "sasrec" / "item_embeddings.pt")
    atomic_torch_save(torch.randn(num_users, COLLAB_DIM, generator=g),
                      run_dir / "sasrec" / "user_embeddings.pt")
    mark_stage_complete(run_dir, "sasrec", {"dataset": dataset, "num_items": ITEMS,
                                            "num_users": num_users})
    return run_dir


def small_model(run_dir: Path, **kwargs) -> DualTokenizer:
    quantizer = partial(RQVAE, codebook_sizes=[16, 16, 16], code_dim=8, hidden_dims=[32],
                        warmup_steps=8)
    return DualTokenizer(quantizer=quantizer, fused_dim=32, fusion_hidden=[64],
                         run_dir=str(run_dir), **kwargs)


def data(run_dir: Path | None, **kwargs) -> TokenizerDataModule:
    kwargs.setdefault("text_encoder", HashTextEncoder())
    return TokenizerDataModule(max_users=USERS, run_dir=None if run_dir is None else str(run_dir),
                               batch_size=512, **kwargs)


def trainer(**kwargs) -> L.Trainer:
    args = dict(max_epochs=5, limit_train_batches=4, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                accelerator="cpu", callbacks=[TwoPhaseLossSchedule(phase1_epochs=1)])
    return L.Trainer(**{**args, **kwargs})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = fake_sasrec(tmp_path_factory.mktemp("run"))
    torch.manual_seed(0)
    dm, model = data(run_dir), small_model(run_dir)
    tr = trainer()
    tr.fit(model, datamodule=dm)
    return SimpleNamespace(run_dir=run_dir, dm=dm, model=model, trainer=tr,
                           metrics=model.export_artifacts())


def test_training_follows_the_two_phase_schedule_and_logs(trained):
    model, logged = trained.model, trained.trainer.callback_metrics
    assert (model.alpha, model.gamma) == (0.1, 1.0)  # phase 2 after epoch 0
    # phase 2 had 16 steps: 8 autoencoder warm-up steps, k-means init, 8 quantized steps
    assert all(q.initialized and int(q.warmup_progress) == 8 for q in model.quantizers.values())
    for key in ("train/u2i", "train/loss", "train/items/recon", "train/users/commitment",
                "val/items/utilization_l0", "val/items/perplexity_l2", "val/users/collision_rate",
                "val/items/recon"):
        assert key in logged, key
    assert 0 < float(logged["val/items/utilization_l0"]) <= 1


def test_export_returns_the_metrics_json_entry(trained):
    metrics = trained.metrics
    assert set(metrics) == {"items", "users"}
    for side in ("items", "users"):
        assert set(metrics[side]) == {"collision_rate", "utilization"}
        assert metrics[side]["collision_rate"] == 0.0
        assert all(0 < u <= 1 for u in metrics[side]["utilization"])
    # 1682 items over 16 first-level codes: every code is used
    assert metrics["items"]["utilization"][0] >= 0.5


def test_scid_map_round_trip(trained):
    scid = load_scid_map(trained.run_dir / "tokenizer")
    assert scid.item_codes.shape[0] == ITEMS and scid.user_codes.shape[0] == USERS
    for codes, sizes in ((scid.item_codes, scid.item_codebook_sizes),
                         (scid.user_codes, scid.user_codebook_sizes)):
        assert len(torch.unique(codes, dim=0)) == len(codes)  # no two entities share an ID
        assert sizes[:3] == [16, 16, 16]
        assert (codes.max(0).values < torch.tensor(sizes)).all()
    assert scid.item_string(0).startswith("<a_") and "<c_" in scid.item_string(0)
    assert scid.user_string(0).startswith("<u_") and "<w_" in scid.user_string(0)
    assert scid.statistics() == trained.metrics
    assert len(scid.fingerprint) == 16
    stats = json.loads((trained.run_dir / "tokenizer" / "codebook_stats.json").read_text())
    assert scid.meta["statistics"] == stats
    for side in ("items", "users"):
        assert stats[side]["collision_rate_after"] == 0.0
        assert stats[side]["collision_rate_before"] >= 0.0
        assert len(stats[side]["levels"]) == len(trained.metrics[side]["utilization"])
        level = stats[side]["levels"][0]
        assert level["codebook_size"] == 16 and 1 <= level["perplexity"] <= 16


def test_export_is_deterministic_and_checkpoints_reload(trained, tmp_path):
    before = load_scid_map(trained.run_dir / "tokenizer")
    assert trained.model.export_artifacts() == trained.metrics
    again = load_scid_map(trained.run_dir / "tokenizer")
    assert torch.equal(before.item_codes, again.item_codes)
    assert before.fingerprint == again.fingerprint
    ckpt = tmp_path / "tokenizer.ckpt"
    trained.trainer.save_checkpoint(ckpt)
    # Built in Python, the hparams hold a functools.partial: trusted pickle needed. (Built by
    # the CLI they hold class_path/init_args; see the residual k-means test.)
    reloaded = DualTokenizer.load_from_checkpoint(ckpt, weights_only=False)
    reloaded.attach_data(**trained.dm.tokenizer_inputs())
    reloaded.eval()
    trained.model.eval()
    assert torch.equal(reloaded.encode_side("items")[0], trained.model.encode_side("items")[0])


def test_u2i_negatives_exclude_training_positives(trained):
    dm = trained.dm
    batch = dm._collate(list(range(512)))
    assert batch["negatives"].shape == (512, 60) and batch["negative_mask"].float().mean() > 0.99
    positives = {}
    for user, items in zip(dm.split.users.tolist(), dm.split.train_items):
        positives[user] = set(items.tolist())
    for user, negs, mask in zip(batch["users"], batch["negatives"], batch["negative_mask"]):
        valid = {int(n) for n, ok in zip(negs, mask) if ok}
        assert not valid & positives[int(user)]
    # the positives are training items only (never the validation or test targets)
    assert len(dm.pair_items) == sum(len(t) for t in dm.split.train_items)
    val = next(iter(dm.val_dataloader()))
    assert torch.equal(val["items"], torch.arange(ITEMS))
    assert torch.equal(val["users"], torch.arange(USERS))


def test_inputs_are_normalised_text_and_collaborative_blocks(trained):
    x = trained.dm.item_x
    assert x.shape == (ITEMS, TEXT_DIM + COLLAB_DIM)
    assert torch.allclose(x[:, :TEXT_DIM].norm(dim=1), torch.ones(ITEMS), atol=1e-5)
    assert torch.allclose(x[:, TEXT_DIM:].norm(dim=1), torch.ones(ITEMS), atol=1e-5)
    assert trained.dm.info["features"] == ["semantic", "collaborative"]


def test_collaborative_weight_scales_only_that_block(trained, tmp_path):
    dm = data(trained.run_dir, collaborative_weight=2.0)
    dm.setup()
    for x, ref in ((dm.item_x, trained.dm.item_x), (dm.user_x, trained.dm.user_x)):
        assert torch.equal(x[:, :TEXT_DIM], ref[:, :TEXT_DIM])
        assert torch.allclose(x[:, TEXT_DIM:], 2.0 * ref[:, TEXT_DIM:])
    assert dm.info["block_weights"] == {"semantic": 1.0, "collaborative": 2.0}
    assert trained.dm.info["block_weights"] == {"semantic": 1.0, "collaborative": 1.0}
    # one block: nothing to balance, the inputs stay unit rows
    dm = data(trained.run_dir, features="collaborative", collaborative_weight=3.0)
    dm.setup()
    assert torch.allclose(dm.item_x.norm(dim=1), torch.ones(ITEMS), atol=1e-5)
    for bad in (0, -1.0, float("nan"), "2", True):
        with pytest.raises(ValueError, match="collaborative_weight must be a finite number > 0"):
            data(trained.run_dir, collaborative_weight=bad)


def test_neighbour_smoothing_by_hand():
    """Item 1 occurs twice (beside 0 and 2, and beside 2): weight 2/(2+k) on its own row and
    k/(2+k) on the mean of its three neighbour occurrences; item 3 has none and stays."""
    e = torch.tensor([[3.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 5.0]])
    out = neighbour_smoothed(e, [np.array([0, 1, 2]), [1, 2], [], [3]], 1.0)
    unit = torch.eye(4)
    assert torch.allclose(out[0], (1 * unit[0] + 1 * unit[1]) / 2)
    assert torch.allclose(out[1], (2 * unit[1] + (unit[0] + 2 * unit[2]) / 3) / 3)
    assert torch.allclose(out[2], (2 * unit[2] + unit[1]) / 3)
    assert torch.equal(out[3], unit[3])
    assert torch.equal(neighbour_smoothed(e, [[0, 1, 2]], 0.0), unit)
    # a large pseudo-count leaves a seen item near the mean of its neighbours
    assert torch.allclose(neighbour_smoothed(e, [[0, 1]], 1e6)[0], unit[1], atol=1e-5)
    for bad in ([[0, 4]], [[-1, 2]]):
        with pytest.raises(ValueError, match="item ids outside 0..3"):
            neighbour_smoothed(e, bad, 1.0)
    with pytest.raises(ValueError, match="pseudo-count must be a finite number >= 0"):
        neighbour_smoothed(e, [[0, 1]], -1.0)


def test_collaborative_smoothing_moves_rare_items_only_and_only_items(trained):
    """Computed from the training sequences (held-out targets are not in them): rows of items
    seen often barely move, rows of items seen once move most; users and the text block are
    untouched."""
    dm = data(trained.run_dir, collaborative_smoothing=2.0)
    dm.setup()
    split = dm.split
    assert torch.equal(dm.user_x, trained.dm.user_x)
    assert torch.equal(dm.item_x[:, :TEXT_DIM], trained.dm.item_x[:, :TEXT_DIM])
    raw = torch.load(trained.run_dir / "sasrec" / "item_embeddings.pt")
    expected = torch.nn.functional.normalize(
        neighbour_smoothed(raw, split.train_items, 2.0), dim=1)
    assert torch.allclose(dm.item_x[:, TEXT_DIM:], expected, atol=1e-6)
    moved = (dm.item_x[:, TEXT_DIM:] - trained.dm.item_x[:, TEXT_DIM:]).norm(dim=1)
    counts = torch.from_numpy(split.train_item_counts())
    assert moved[counts == 0].max() < 1e-6  # in no training sequence: nothing to lean on
    assert moved[counts >= 20].mean() < moved[counts == 1].mean() / 3
    assert dm.info["collaborative_smoothing"] == 2.0
    assert "collaborative_smoothing" not in trained.dm.info  # off: exported as before it
    for bad in (-1.0, float("inf"), "2", True):
        with pytest.raises(ValueError, match="collaborative_smoothing must be a finite number"):
            data(trained.run_dir, collaborative_smoothing=bad)


def test_items_only_and_shared_quantizer(tmp_path):
    torch.manual_seed(0)
    items, users = torch.randn(300, 20), torch.randn(80, 20)
    shared = small_model(tmp_path / "shared", share_quantizer=True)
    shared.attach_data(items, users)
    assert len(shared.quantizers) == 1
    assert shared.quantizer_for("users") is shared.quantizer_for("items")
    metrics = shared.export_artifacts()  # k-means init on items + users together
    assert metrics["users"]["collision_rate"] == 0 == metrics["items"]["collision_rate"]
    items_only = small_model(tmp_path / "items", tokenize_users=False)
    items_only.attach_data(items, users)
    assert set(items_only.export_artifacts()) == {"items"}
    assert not load_scid_map(tmp_path / "items" / "tokenizer").has_users


def test_missing_or_mismatched_sasrec_artifacts_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="'sasrec' stage"):
        data(tmp_path / "empty").setup()
    with pytest.raises(ValueError, match="num_users=943 but the dataset has 100"):
        data(fake_sasrec(tmp_path / "full", num_users=943)).setup()
    with pytest.raises(ValueError, match="dataset 'beauty'"):
        data(fake_sasrec(tmp_path / "other", dataset="beauty")).setup()
    with pytest.raises(ValueError, match=r"item_embeddings.pt: expected a float tensor \[1682"):
        data(fake_sasrec(tmp_path / "rows", item_rows=1000)).setup()
    with pytest.raises(ValueError, match="run_dir"):
        data(None).setup()
    # semantic-only needs no sasrec stage at all
    dm = data(None, features="semantic")
    dm.setup()
    assert dm.item_x.shape == (ITEMS, TEXT_DIM)


def test_datasets_without_text(tmp_path):
    run_dir = fake_sasrec(tmp_path)
    dm = data(run_dir)
    dm.load()
    full = dm.dataset
    dm.dataset = replace(full, item_features=None, user_features=None)
    dm.setup()  # no text at all: collaborative-only
    assert dm.info["features"] == ["collaborative"] and dm.item_x.shape[1] == COLLAB_DIM
    dm = data(run_dir, features="semantic")
    dm.load()
    dm.dataset = replace(full, item_features=None)
    with pytest.raises(DataError, match="no item text"):
        dm.setup()
    # item text without user profiles: a user reads like the mean of its training items' texts
    dm = data(run_dir, features="semantic")
    dm.load()
    dm.dataset = replace(full, user_features=None)
    dm.setup()
    row = 3
    user, hist = int(dm.split.users[row]), dm.split.train_items[row]
    item_text = HashTextEncoder().encode([full.item_text(i) for i in range(ITEMS)])
    expected = torch.nn.functional.normalize(item_text[torch.as_tensor(hist)].mean(0), dim=0)
    assert torch.allclose(dm.user_x[user], expected, atol=1e-5)


def cli_args(*configs: str, run_dir: Path, extra: list[str] = ()) -> list[str]:
    args = [a for c in configs for a in ("--config", str(ROOT / c))]
    return args + [f"--model.init_args.run_dir={run_dir}", f"--data.init_args.run_dir={run_dir}",
                   "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                   "--trainer.enable_model_summary=false", *extra]


def test_yaml_swaps_the_quantizer_to_residual_kmeans(tmp_path):
    from cli import Align3CLI

    run_dir = fake_sasrec(tmp_path)
    extra = [f"--data.init_args.max_users={USERS}", "--data.init_args.features=collaborative",
             "--model.init_args.quantizer.init_args.codebook_sizes=[16,16,16]",
             "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
             f"--trainer.default_root_dir={tmp_path}"]
    cli = Align3CLI(args=cli_args("configs/ml100k/tokenizer.yaml",
                                  "configs/ablations/tokenizer_residual_kmeans.yaml",
                                  run_dir=run_dir, extra=extra), run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert all(isinstance(q, ResidualKMeans) for q in cli.model.quantizers.values())
    metrics = cli.model.export_artifacts()
    assert metrics["items"]["collision_rate"] == 0 == metrics["users"]["collision_rate"]
    assert metrics["items"]["utilization"][0] == 1.0
    assert load_scid_map(run_dir / "tokenizer").meta["model"]["quantizer"]["class"] == \
        "ResidualKMeans"
    cli.trainer.save_checkpoint(tmp_path / "cli.ckpt")
    reloaded = DualTokenizer.load_from_checkpoint(tmp_path / "cli.ckpt")  # safe (weights_only)
    assert isinstance(reloaded.quantizers["item"], ResidualKMeans)
    assert reloaded.hparams.item_input_dim == COLLAB_DIM


@pytest.mark.parametrize("ablation, check", [
    (None, lambda m, d: isinstance(m.quantizer_factory(8, 8), RQVAE) and d.features == "both"),
    ("semantic_only", lambda m, d: d.features == "semantic"),
    ("collaborative_only", lambda m, d: d.features == "collaborative"),
    ("no_u2i", lambda m, d: not m.u2i),
    ("items_only", lambda m, d: not m.tokenize_users),
    ("residual_kmeans", lambda m, d: isinstance(m.quantizer_factory(8, 8), ResidualKMeans)),
])
def test_configs_compose(ablation, check, tmp_path):
    from cli import Align3CLI

    configs = ["configs/ml100k/tokenizer.yaml"]
    if ablation:
        configs.append(f"configs/ablations/tokenizer_{ablation}.yaml")
    cli = Align3CLI(args=cli_args(*configs, run_dir=tmp_path), run=False)
    assert isinstance(cli.model, DualTokenizer)
    assert isinstance(cli.datamodule, TokenizerDataModule)
    assert check(cli.model, cli.datamodule)


def test_u2i_lever_config_keeps_the_checkpoint_and_reweights_phase_2(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from cli import Align3CLI

    cli = Align3CLI(args=cli_args("configs/ml100k/tokenizer.yaml",
                                  "configs/ablations/tokenizer_u2i_1.0.yaml", run_dir=tmp_path),
                    run=False)
    schedules = [c for c in cli.trainer.callbacks if isinstance(c, TwoPhaseLossSchedule)]
    assert len(schedules) == 1
    assert [schedules[0].weights(e) for e in (3, 4)] == [(1.0, 0.0), (1.0, 1.0)]
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert [c.filename for c in checkpoints] == ["tokenizer"]


def test_loss_schedule_phases():
    schedule = TwoPhaseLossSchedule(phase1_epochs=2)
    assert [schedule.weights(e) for e in range(4)] == [(1.0, 0.0)] * 2 + [(0.1, 1.0)] * 2
    module = SimpleNamespace(u2i=False, alpha=None, gamma=None)
    schedule.on_train_epoch_start(SimpleNamespace(current_epoch=0), module)
    assert (module.alpha, module.gamma) == (0.1, 1.0)  # nothing to align without U2I


def test_text_encoder_caches_by_encoder_and_texts(tmp_path, monkeypatch):
    texts = ["Toy Story, 1995, Animation", "age: 24, gender: M, occupation: technician"]
    encoder = TextEncoder(cache_dir=str(tmp_path), show_progress=False)
    emb = encoder.encode(texts)
    assert emb.shape == (2, 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    assert "/" not in encoder.name or not encoder.name.startswith("/")  # portable cache key

    fresh = TextEncoder(cache_dir=str(tmp_path))
    monkeypatch.setattr(fresh, "_load", lambda: pytest.fail("the cache should have been used"))
    assert torch.equal(fresh.encode(texts), emb)
    assert fresh.cache_key(texts) != fresh.cache_key(texts[::-1])
    assert fresh.cache_key(texts) != TextEncoder(model="other/model").cache_key(texts)


def test_ddp_replicas_keep_identical_codebooks(tmp_path):
    """2 CPU processes with frequent dead-code resets (which write codebooks outside the
    optimizer, from each rank's own batch): the replicas must still agree."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, str(fake_sasrec(tmp_path))], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "ddp_result.json").read_text())
    assert result["ranks_equal"]
    assert result["metrics"]["items"]["collision_rate"] == 0


def _ddp_worker(run_dir: Path) -> None:
    """Rank body of :func:`test_ddp_replicas_keep_identical_codebooks` (Lightning's DDP
    launcher re-runs this file for rank 1)."""
    L.seed_everything(0)
    quantizer = partial(RQVAE, codebook_sizes=[64, 16, 16], code_dim=8, hidden_dims=[32],
                        warmup_steps=4, dead_code_steps=3)
    model = DualTokenizer(quantizer=quantizer, fused_dim=32, fusion_hidden=[64],
                          run_dir=str(run_dir))
    # Plain "ddp", as `--trainer.strategy ddp` gives it: phase 1 leaves the quantizers out of
    # the loss, and the model itself turns on DDP's find_unused_parameters.
    tr = trainer(strategy="ddp", devices=2, max_epochs=6)
    tr.fit(model, datamodule=data(run_dir))
    books = torch.cat([q.codebooks.codebooks[0].data for q in model.quantizers.values()])
    gathered = tr.strategy.all_gather(books)
    if tr.is_global_zero:
        result = {"ranks_equal": bool(torch.equal(gathered[0], gathered[1])),
                  "metrics": model.export_artifacts()}
        (run_dir / "ddp_result.json").write_text(json.dumps(result))
    end_distributed()


if __name__ == "__main__":
    from cli import end_distributed

    _ddp_worker(Path(sys.argv[1]))


def _stage_codes(run_dir: Path, threads: int, extra: list[str]) -> dict:
    from cli import run_stage

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_stage("tokenizer", str(ROOT / "configs" / "ml100k" / "tokenizer.yaml"), run_dir, [
            f"--data.init_args.max_users={USERS}", "--data.init_args.features=collaborative",
            "--trainer.max_epochs=6", "--trainer.limit_train_batches=6",
            "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.logger=false", *extra])
    finally:
        torch.set_num_threads(old)
    return json.loads((run_dir / "tokenizer" / "scid_map.json").read_text())


def test_scids_do_not_depend_on_the_thread_count(tmp_path):
    """The shipped tokenizer config, run at 1 and at 2 torch threads: identical SCID maps (the
    stage computes at its own `compute_threads`)."""
    maps = [_stage_codes(fake_sasrec(tmp_path / f"t{t}"), t, []) for t in (1, 2)]
    assert maps[0]["items"]["codes"] == maps[1]["items"]["codes"]
    assert maps[0]["users"]["codes"] == maps[1]["users"]["codes"]
    with pytest.raises(ValueError, match="compute_threads"):
        DualTokenizer(compute_threads=0)
