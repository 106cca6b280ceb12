"""The dpo stage on a tiny real slice: scoring, leak-free pairs, reference handling, a full run."""

import dataclasses
import importlib.util
import json
import logging

import lightning as L
import numpy as np
import pytest
import torch
from dpo_fixtures import MAX_USERS, data_kwargs, make_sft_run, shared_sft_run
from lightning.pytorch.callbacks import Callback

from callbacks.selfplay import SelfPlayCallback
from datamodules.preference_data import NEGATIVE_KINDS, PreferenceDataModule
from lightning_modules.components.prompts import encode_prompts
from lightning_modules.preference_aligner import (
    PreferenceAligner,
    PreferenceStage,
    default_stages,
    score_responses,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return shared_sft_run(tmp_path_factory)


def _connected(run_dir, stages=None, **data_overrides):
    dm = PreferenceDataModule(**{**data_kwargs(run_dir), "num_negatives": 5, **data_overrides})
    model = PreferenceAligner(run_dir=str(run_dir), stages=stages).prepare(dm)
    return dm, model


def _trainer(callbacks, **kwargs):
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, callbacks=callbacks, **kwargs)


def test_cached_response_scoring_equals_full_sequence_scoring(run_dir):
    dm, model = _connected(run_dir)
    specs = dm.sample_specs(0, "easy")[:3]
    prompts = dm.prompt_texts(specs)
    items = torch.tensor([[s.chosen, 5, 17, 1000] for s in specs])
    got = model.response_logps(prompts, items)                        # [3, 4]
    policy = model.policy
    flat_prompts = [p for p in prompts for _ in range(items.shape[1])]
    flat_items = [policy.item_response(i) for i in items.reshape(-1).tolist()]
    expected = policy.sequence_logprobs(flat_prompts, flat_items).view_as(got)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # The KV-cache form (for attention kernels without 4-D masks) agrees, gradients included.
    enc = encode_prompts(policy.tokenizer, prompts)
    tokens = policy.item_tokens[items]
    grads = {}
    for method in ("packed", "cache"):
        model.policy.model.zero_grad()
        scores = score_responses(policy.model, enc["input_ids"], enc["attention_mask"], tokens,
                                 method=method)
        torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
        scores.sum().backward()
        grads[method] = {n: p.grad.clone() for n, p in model.trainable_parameters().items()}
    assert any(g.abs().sum() > 0 for g in grads["packed"].values())
    for name, g in grads["packed"].items():
        torch.testing.assert_close(g, grads["cache"][name], atol=1e-4, rtol=1e-3)


def _adversarial_candidates(dm, specs):
    """Beam rows that contain every forbidden thing: held-out targets, the chosen item, the
    user's other items, padding; plus a few unseen items."""
    s = dm.split
    rows = []
    for spec in specs:
        r = spec.row
        row = [int(s.valid_target[r]), int(s.test_target[r]), spec.chosen, -1]
        row += [int(i) for i in s.train_items[r][:10]]
        row += [i for i in range(0, 200, 7) if i not in dm.interacted(r)][:20]
        rows.append(row[:36])
    width = max(map(len, rows))
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows])


@pytest.mark.parametrize("never_engaged", [False, True])
def test_pairs_follow_the_training_split(run_dir, never_engaged):
    dm, model = _connected(run_dir, dislike_never_engaged=never_engaged, num_negatives=50)
    s = dm.split
    cb = SelfPlayCallback(num_beams=20, batch_size=16, progress_bar=False)
    checked = 0
    for kind in NEGATIVE_KINDS:
        specs = dm.sample_specs(3, kind)
        assert specs
        for source in ("adversarial", "policy"):
            if kind == "random" and source == "policy":
                continue
            if source == "adversarial":
                cands = _adversarial_candidates(dm, specs)
            else:
                cands, _ = cb.generate(None, model, dm.prompt_texts(specs),
                                       dm.beam_exclusions(specs, kind))
            pairs = dm.build_pairs(specs, kind, None if kind == "random" else cands, epoch=3)
            for spec, (_, chosen, rejected) in zip(pairs.specs, pairs.as_records()):
                r = spec.row
                train = s.train_items[r]
                assert spec.position < len(train) and chosen == int(train[spec.position])
                assert chosen not in rejected and len(set(rejected)) == len(rejected)
                if kind in ("dislike", "neutral"):
                    assert s.train_ratings[r][spec.position] >= dm.like_threshold
                    rated = set(dm.feedback_items(r, kind))
                    for item in rejected:
                        assert item in rated or (never_engaged and kind == "dislike"
                                                 and item not in dm.interacted(r))
                else:
                    assert not set(rejected) & dm.interacted(r)
                checked += 1
    assert checked > 100


def test_pairs_do_not_depend_on_held_out_targets(run_dir):
    """Pairs (and the policy's beam exclusions) are the same whether the validation and test
    targets are the real ones or any other items: no held-out label shapes a training pair."""
    import copy

    dm, _ = _connected(run_dir, dislike_never_engaged=True)
    real = dm.split
    rng = np.random.default_rng(0)
    fake = copy.copy(real)  # the shared split object stays untouched
    fake.valid_target = rng.integers(0, dm.num_items, size=len(real.users))
    fake.test_target = rng.integers(0, dm.num_items, size=len(real.users))
    for kind in NEGATIVE_KINDS:
        results = []
        specs = dm.sample_specs(2, kind)
        cands = None if kind == "random" else _adversarial_candidates(dm, specs)
        for split in (real, fake):
            dm.split, dm._interacted = split, None
            pairs = dm.build_pairs(specs, kind, cands, epoch=2)
            results.append((pairs.as_records(), dm.beam_exclusions(specs, kind),
                            dm.prompt_texts(specs)))
        dm.split, dm._interacted = real, None
        assert results[0] == results[1], kind
        assert results[0][0], kind


class _Probe(Callback):
    """Records, at the start of every epoch, the reference, the policy and the pairs."""

    def __init__(self):
        self.seen = {}

    def on_train_epoch_start(self, trainer, pl_module):
        clone = {n: t.detach().clone() for n, t in pl_module._reference.items()}
        policy = {n: p.detach().clone() for n, p in pl_module.trainable_parameters().items()}
        pairs = trainer.datamodule.pairs
        self.seen[trainer.current_epoch] = {
            "reference": clone, "policy": policy, "prompts": list(pairs.prompts),
            "chosen": pairs.chosen.clone(), "rejected": pairs.rejected.clone(),
            "ref_chosen": pairs.ref_chosen.clone(), "ref_rejected": pairs.ref_rejected.clone()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_reference_frozen_within_a_stage_and_reset_between_stages(run_dir):
    stages = [PreferenceStage("sp_easy", epochs=2, lr=5e-3),
              PreferenceStage("sp_medium", epochs=1, lr=5e-3)]
    dm = PreferenceDataModule(**data_kwargs(run_dir), num_negatives=4)
    model = PreferenceAligner(run_dir=str(run_dir), stages=stages)
    probe = _Probe()
    trainer = _trainer([SelfPlayCallback(num_beams=20, batch_size=16, progress_bar=False), probe],
                       limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    e0, e1, e2 = probe.seen[0], probe.seen[1], probe.seen[2]
    assert _same(e0["reference"], e0["policy"])            # stage start: reference = policy
    assert _same(e1["reference"], e0["reference"])         # frozen inside the stage
    assert not _same(e1["policy"], e1["reference"])        # ... while the policy trained
    assert _same(e2["reference"], e2["policy"])            # new stage: reset to the policy
    assert not _same(e2["reference"], e0["reference"])
    # Epoch 1's reference log-probs are those of the stage-start policy, not the current one.
    params = model.trainable_parameters()
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(e0["policy"][name])
    items = torch.cat([e1["chosen"].unsqueeze(1), e1["rejected"].clamp(min=0)], dim=1)
    with torch.no_grad():
        expected = model.response_logps(e1["prompts"], items)
    valid = torch.cat([torch.ones_like(e1["chosen"], dtype=torch.bool).unsqueeze(1),
                       e1["rejected"] >= 0], dim=1)
    ref = torch.cat([e1["ref_chosen"].unsqueeze(1), e1["ref_rejected"]], dim=1)
    torch.testing.assert_close(ref[valid], expected[valid], atol=1e-4, rtol=1e-4)
    # The weights of the last stage's start are not what the run ended with.
    assert not _same(e2["policy"], e0["policy"])


def test_feedback_stages_skipped_without_ratings(run_dir, caplog):
    dm = PreferenceDataModule(**data_kwargs(run_dir))
    dm.setup("fit")
    dm.split = dataclasses.replace(dm.split, train_ratings=None)
    assert not dm.has_feedback
    model = PreferenceAligner(run_dir=str(run_dir))
    with caplog.at_level(logging.WARNING):
        model.set_feedback_available(dm.has_feedback, "no-ratings-data")
    assert [s.name for s in model.schedule] == ["sp_easy", "sp_medium", "sp_hard"]
    assert "rf_dislike" in caplog.text and "no ratings" in caplog.text
    only_rf = PreferenceAligner(run_dir=str(run_dir),
                                stages=[PreferenceStage("rf_dislike")])
    with pytest.raises(ValueError, match="needs ratings"):
        only_rf.set_feedback_available(False)


def test_stage_configuration_errors():
    with pytest.raises(ValueError, match="negatives"):
        PreferenceStage("my_stage")
    with pytest.raises(ValueError, match="unknown negatives"):
        PreferenceStage("x", negatives="nope")
    assert PreferenceStage("my_stage", negatives="hard").negatives == "hard"
    assert [s.negatives for s in default_stages()] == ["easy", "medium", "hard", "dislike",
                                                       "neutral"]


def _check_ranks(stage_dir, record, num_users):
    """ranks_<split>.npy hold one rank per user, in the raw-id order of ranks_users.json, and
    reproduce the stage's recall/NDCG."""
    users = json.loads((stage_dir / "ranks_users.json").read_text())
    for split in ("valid", "test"):
        ranks = np.load(stage_dir / f"ranks_{split}.npy")
        assert ranks.dtype == np.int64 and len(ranks) == len(users[split]) == num_users
        for k in (5, 10):
            assert np.mean(ranks < k) == pytest.approx(record[split][f"recall@{k}"], abs=1e-6)
            gain = np.where(ranks < k, 1.0 / np.log2(np.minimum(ranks, 10**9) + 2.0), 0.0)
            assert gain.mean() == pytest.approx(record[split][f"ndcg@{k}"], abs=1e-6)
    assert users["not_reached"] == 1 << 30


def _dpo_run(run_dir, tmp_path, *flags):
    """The shipped dpo YAML, shrunk by flags (plus ``flags``), through the pipeline's stage
    runner on a copy of the tiny sft run; returns the run folder and the stage record."""
    import shutil
    from pathlib import Path

    from cli import run_stage

    run = tmp_path / "run"
    shutil.copytree(run_dir / "tokenizer", run / "tokenizer")
    shutil.copytree(run_dir / "sft", run / "sft")
    config = Path(__file__).resolve().parent.parent / "configs" / "ml100k" / "dpo.yaml"
    record = run_stage("dpo", str(config), run, [
        f"--data.init_args.max_users={MAX_USERS}", "--data.init_args.num_negatives=4",
        "--data.init_args.batch_size=8", "--data.init_args.eval_batch_size=16",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", *flags])
    return run, record


def test_short_run_through_the_cli(run_dir, tmp_path):
    """The shipped YAML, shrunk by flags, through the pipeline's stage runner."""
    from lightning_modules.generative_recommender import GenerativeRecommender

    run, record = _dpo_run(run_dir, tmp_path)
    names = ["sp_easy", "sp_medium", "sp_hard", "rf_dislike", "rf_neutral"]
    assert list(record["per_stage"]) == names
    for name in names:
        assert set(record["per_stage"][name]["valid"]) == {"recall@5", "recall@10", "ndcg@5",
                                                           "ndcg@10"}
        stats = json.loads((run / "dpo" / name / "pairs.json").read_text())
        assert stats["per_epoch"], name
        metrics = json.loads((run / "dpo" / name / "metrics.json").read_text())
        assert metrics["train"], name
        train = next(iter(metrics["train"].values()))
        assert 0.0 <= train["rewards/accuracy"] <= 1.0 and train["loss"] > 0
    assert set(record["test"]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
    assert json.loads((run / "dpo" / "stage.json").read_text())["per_stage"]
    _check_ranks(run / "dpo", record, MAX_USERS)
    timing = record["timing"]["seconds"]     # self-play generation is timed apart from training
    assert timing["selfplay"] > 0 and timing["fit"] >= timing["train"] + timing["selfplay"]
    # The shipped stage chose between its start and its best epoch on validation, and the
    # exported policy (loadable like the SFT export) is the one it reports.
    chosen = record["selected"]
    assert chosen["metric"] == "ndcg@10" and chosen["policy"] in ("start", "trained")
    assert record["valid"] == chosen[f"{chosen['policy']}_valid"]
    start, trained = chosen["start_valid"]["ndcg@10"], chosen["trained_valid"]["ndcg@10"]
    assert (chosen["policy"] == "start") == (start >= trained)
    dpo = GenerativeRecommender.from_pretrained_dir(run / "dpo" / "hf")
    sft = GenerativeRecommender.from_pretrained_dir(run / "sft" / "hf")
    sd_dpo, sd_sft = dpo.model.state_dict(), sft.model.state_dict()
    same = all(torch.equal(sd_dpo[k], sd_sft[k]) for k in sd_sft)
    assert same == (chosen["policy"] == "start")
    from lightning_modules.components.report import collect, render_report

    report = render_report(collect(run, "ml-100k", ["dpo"]))
    assert f"Kept: the **{chosen['policy']}** policy" in report


def test_a_preference_stage_that_validates_worse_gives_back_the_starting_policy(run_dir,
                                                                                 tmp_path):
    """A preference stage that does not validate above its start (a destructive learning
    rate on the barely trained tiny policy; ties keep the start) gives the starting (sft)
    policy back: exported, written over the best checkpoint, and reported."""
    from lightning_modules.generative_recommender import GenerativeRecommender

    run, record = _dpo_run(run_dir, tmp_path, "--trainer.logger=false",
                           "--model.init_args.stages=[{name: sp_easy, "
                           "epochs: 1, lr: 0.5}]")
    chosen = record["selected"]
    assert chosen["policy"] == "start"
    assert chosen["start_valid"]["ndcg@10"] >= chosen["trained_valid"]["ndcg@10"]
    assert record["valid"] == chosen["start_valid"]
    _check_ranks(run / "dpo", record, MAX_USERS)
    dpo = GenerativeRecommender.from_pretrained_dir(run / "dpo" / "hf").model.state_dict()
    sft = GenerativeRecommender.from_pretrained_dir(run / "sft" / "hf").model.state_dict()
    assert all(torch.equal(dpo[k], sft[k]) for k in sft)
    ckpt = torch.load(run / "dpo" / "checkpoints" / "best.ckpt", weights_only=False,
                      map_location="cpu")["state_dict"]
    for name, tensor in sft.items():
        assert torch.equal(ckpt[f"policy.model.{name}"], tensor), name


def test_without_keep_start_the_trained_policy_is_kept(run_dir, tmp_path):
    from lightning_modules.generative_recommender import GenerativeRecommender

    run, record = _dpo_run(run_dir, tmp_path, "--trainer.logger=false",
                           "--model.init_args.keep_start=false",
                           "--model.init_args.stages=[{name: sp_easy, epochs: 1, lr: 0.5}]")
    assert "selected" not in record
    dpo = GenerativeRecommender.from_pretrained_dir(run / "dpo" / "hf").model.state_dict()
    sft = GenerativeRecommender.from_pretrained_dir(run / "sft" / "hf").model.state_dict()
    assert any(not torch.equal(dpo[k], sft[k]) for k in sft)


@pytest.mark.parametrize("mode, start, trained, kept", [
    ("max", 0.30, 0.20, "start"), ("max", 0.20, 0.30, "trained"), ("max", 0.25, 0.25, "start"),
    ("min", 0.30, 0.20, "trained"), ("min", 0.20, 0.30, "start")])
def test_select_start_compares_on_the_checkpoint_metric(mode, start, trained, kept):
    from types import SimpleNamespace

    from cli import ConfigError, _select_start

    restored, saved = [], []
    model = SimpleNamespace(stage_name="dpo", last_ranks={"valid": "trained ranks"},
                            restore_start=lambda: restored.append(True))
    trainer = SimpleNamespace(checkpoint_callback=SimpleNamespace(monitor="val/ndcg@10",
                                                                  mode=mode),
                              save_checkpoint=saved.append)
    out = _select_start(trainer, model, {"ndcg@10": start}, "start ranks",
                        {"ndcg@10": trained}, "best.ckpt")
    assert model.selection["policy"] == kept
    assert out == {"ndcg@10": start if kept == "start" else trained}
    assert bool(restored) == bool(saved) == (kept == "start")
    assert model.last_ranks["valid"] == ("start ranks" if kept == "start" else "trained ranks")
    with pytest.raises(ConfigError, match="ndcg@10"):
        _select_start(trainer, model, {"recall@10": 0.1}, None, {"recall@10": 0.2}, None)


def test_reference_swap_with_a_lora_policy(tmp_path):
    """peft policy: the reference is a snapshot of the adapters + trainable token rows; while
    swapped in, the policy scores exactly as at the stage start; the base stays shared."""
    run = tmp_path / "lora"
    make_sft_run(run, train_batches=2, backbone={"finetuning": "lora"})
    dm, model = _connected(run)
    trainable = model.trainable_parameters()
    assert any("lora_" in n for n in trainable)
    assert len(trainable) < len(dict(model.policy.model.named_parameters()))
    specs = dm.sample_specs(0, "easy")[:4]
    prompts = dm.prompt_texts(specs)
    items = torch.tensor([[s.chosen, 3, 99] for s in specs])
    model.begin_stage(0)
    with torch.no_grad():
        start = model.response_logps(prompts, items)
        for p in trainable.values():
            p.add_(0.05 * torch.randn_like(p))
        moved = model.response_logps(prompts, items)
    assert not torch.allclose(start, moved)
    torch.testing.assert_close(model.reference_logps(prompts, items), start)
    # the swap is undone: the policy is the moved one again
    with torch.no_grad():
        torch.testing.assert_close(model.response_logps(prompts, items), moved)
    assert model.begin_stage(0) is False              # same stage: reference kept
    assert model.begin_stage(1) is True               # next stage: reference = moved policy
    torch.testing.assert_close(model.reference_logps(prompts, items), moved)


def test_buckets_ignore_an_appended_dedup_level(run_dir):
    dm, _ = _connected(run_dir)
    assert dm.compared_levels() == dm.scid_map.item_levels == 3
    meta = dm.scid_map.meta
    try:
        dm.scid_map.meta = {"statistics": {"items": {"appended_level": True}}}
        assert dm.compared_levels() == 2
        dm.bucket_levels = 1
        assert dm.compared_levels() == 1
        # the chosen item's own first-level code makes a candidate "medium" at 1 level
        specs = dm.sample_specs(0, "medium")[:5]
        codes = dm.scid_map.item_codes
        same_first = [[i for i in range(codes.shape[0]) if codes[i, 0] == codes[s.chosen, 0]
                       and i not in dm.interacted(s.row)][:3] for s in specs]
        cands = torch.tensor([row + [-1] * (3 - len(row)) for row in same_first])
        pairs = dm.build_pairs(specs, "medium", cands)
        assert [r[2] for r in pairs.as_records()] == [row for row in same_first if row]
    finally:
        dm.scid_map.meta, dm.bucket_levels = meta, None


def test_sampling_is_deterministic_per_epoch_and_can_favour_recent_positions(run_dir):
    dm, _ = _connected(run_dir, prompts_per_user=2)
    first, again, other = (dm.sample_specs(e, "easy") for e in (4, 4, 5))
    assert [(s.row, s.position) for s in first] == [(s.row, s.position) for s in again]
    assert [(s.row, s.position) for s in first] != [(s.row, s.position) for s in other]
    assert len(first) == 2 * MAX_USERS
    dm.recent_positions = 3
    for spec in dm.sample_specs(4, "easy"):
        assert spec.position >= len(dm.split.train_items[spec.row]) - 3


def test_a_stage_without_pairs_is_skipped_and_recorded(run_dir, tmp_path, monkeypatch):
    """An epoch whose pairs are empty trains nothing (no crash), the curriculum goes on, and
    the stage is marked skipped in the stage record."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir / "tokenizer", run / "tokenizer")
    shutil.copytree(run_dir / "sft", run / "sft")
    dm, model = _connected(run, stages=[{"name": "sp_easy"}, {"name": "sp_hard"}])
    original = dm.build_pairs

    def no_hard_pairs(specs, kind, candidates=None, epoch=0):
        pairs = original(specs, kind, candidates, epoch=epoch)
        if kind == "hard":
            keep = []
            pairs = dataclasses.replace(pairs, specs=keep, prompts=keep,
                                        chosen=pairs.chosen[:0], rejected=pairs.rejected[:0])
        return pairs

    monkeypatch.setattr(dm, "build_pairs", no_hard_pairs)
    trainer = _trainer([SelfPlayCallback(num_beams=20, batch_size=16, progress_bar=False)],
                       limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    assert trainer.current_epoch == 2                      # both epochs ran
    record = model.export_artifacts()
    assert "skipped" in record["per_stage"]["sp_hard"]
    assert "skipped" not in record["per_stage"]["sp_easy"]


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_exported_model_reloads_with_its_attention_implementation(tmp_path, finetuning):
    """The dpo stage, the Recommender and the server load sft/hf: they compute with the
    attention implementation the sft stage was configured with, not the library default."""
    from lightning_modules.components.decoding import attn_implementation
    from lightning_modules.generative_recommender import GenerativeRecommender

    hf = make_sft_run(tmp_path, train_batches=1,
                      backbone={"attn_implementation": "eager", "finetuning": finetuning})
    again = GenerativeRecommender.from_pretrained_dir(hf)
    assert attn_implementation(again.model) == "eager"


def test_a_flash_attention_model_loads_with_sdpa_where_flash_attention_is_missing(tmp_path):
    """A model trained with flash-attention on a GPU still loads on a CPU (serving, tests)."""
    from lightning_modules.components.decoding import attn_implementation
    from lightning_modules.generative_recommender import SFT_INFO_FILE, GenerativeRecommender

    hf = make_sft_run(tmp_path, train_batches=1)
    info = json.loads((hf / SFT_INFO_FILE).read_text())
    info["backbone"]["attn_implementation"] = "flash_attention_2"
    (hf / SFT_INFO_FILE).write_text(json.dumps(info))
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
        pytest.skip("flash-attention is available here")
    again = GenerativeRecommender.from_pretrained_dir(hf)
    assert attn_implementation(again.model) == "sdpa"
