"""SFT stage end to end on a slice of ML-100K with a tiny random model: training, evaluation,
export, and loading through plain transformers / peft."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.sft_data import SFTDataModule
from lightning_modules.components.scid_map import SCIDMap
from lightning_modules.generative_recommender import (
    GenerativeRecommender,
    load_generative_recommender,
)

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
        "text_vocab_size": 300}
MAX_USERS = 50
TASKS = {"seqrec": 1.0, "item2index": 0.05, "index2item": 0.02, "user2index": 0.05,
         "index2user": 0.02, "fusionseqrec": 0.2}


def scid_map(num_items: int = 1682, num_users: int = 943, sizes=(12, 12, 12)) -> SCIDMap:
    rng = np.random.default_rng(0)

    def codes(n):
        flat = rng.choice(int(np.prod(sizes)), size=n, replace=False)
        return torch.tensor(np.stack(np.unravel_index(flat, sizes), axis=1))

    return SCIDMap(codes(num_items), list(sizes), codes(num_users), list(sizes))


def make_dm(run_dir, **kw) -> SFTDataModule:
    args = dict(dataset="ml-100k", run_dir=str(run_dir), max_users=MAX_USERS, batch_size=16,
                eval_batch_size=32, tasks=TASKS, seed=0)
    args.update(kw)
    return SFTDataModule(**args)


def trainer(**kw) -> L.Trainer:
    args = dict(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    args.update(kw)
    return L.Trainer(**args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of full fine-tuning on 50 users, then test and export."""
    run_dir = tmp_path_factory.mktemp("run")
    scid_map().save(run_dir / "tokenizer")
    L.seed_everything(0, verbose=False)
    dm = make_dm(run_dir)
    model = GenerativeRecommender(run_dir=str(run_dir), backbone=TINY, lr=3e-3,
                                  export_on_fit_end=True)
    tr = trainer(limit_train_batches=15, limit_val_batches=1)
    tr.fit(model, datamodule=dm)
    test = tr.test(model, datamodule=dm, verbose=False)[0]
    return run_dir, dm, model, tr, test


def test_short_sft_run_gives_metrics_and_artifacts(trained):
    run_dir, dm, model, tr, test = trained
    for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
        assert 0.0 <= test[f"test/{key}"] <= 1.0
        assert 0.0 <= model.results["valid"][key] <= 1.0
    assert test["test/recall@10"] >= test["test/recall@5"]
    # A test after the export reports into metrics.json; stage.json stays as exported.
    metrics = json.loads((run_dir / "sft" / "metrics.json").read_text())
    assert set(metrics["test"]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
    assert "test" not in json.loads((run_dir / "sft" / "stage.json").read_text())
    hf = run_dir / "sft" / "hf"
    assert (hf / "scid_map.json").exists() and (hf / "tokenizer.json").exists()


def test_recommendations_are_valid_unseen_items(trained):
    _, dm, model, _, _ = trained
    rows = torch.arange(4)
    prompts = model.build_prompts(rows, "test")
    seen = [dm.split.seen_items(r, "test").tolist() for r in range(4)]
    items, scores = model.recommend(prompts, seen, num_beams=10)
    assert items.shape == (4, 10) and scores.shape == (4, 10)
    for r in range(4):
        got = [i for i in items[r].tolist() if i >= 0]
        assert len(got) == len(set(got)) and not set(got) & set(seen[r])
        assert all(0 <= i < dm.dataset.num_items for i in got)
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    # Beam scores are the teacher-forced log-probabilities of the item's SCID tokens.
    top = items[:, 0].tolist()
    lp = model.sequence_logprobs(prompts, [model.item_response(i) for i in top])
    assert lp.requires_grad
    assert torch.allclose(lp.detach(), scores[:, 0], atol=1e-4)


def test_predict_writes_jsonl(trained):
    run_dir, dm, model, tr, _ = trained
    model.predict_top_k = 5
    tr.predict(model, datamodule=dm)
    lines = (run_dir / "sft" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == MAX_USERS
    rec = json.loads(lines[0])
    assert rec["user"] == dm.dataset.user_ids[0] and len(rec["items"]) == 5
    assert len(rec["titles"]) == 5 and rec["scores"] == sorted(rec["scores"], reverse=True)


def test_full_model_loads_with_plain_transformers(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _, model, _, _ = trained
    hf = run_dir / "sft" / "hf"
    plain = AutoModelForCausalLM.from_pretrained(hf).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    prompt = model.build_prompts(torch.tensor([0]), "valid")[0]
    assert tok(prompt)["input_ids"] == model.tokenizer(prompt)["input_ids"]
    x = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    model.model.eval()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, model.model(input_ids=x).logits,
                              atol=1e-5)
    again = load_generative_recommender(run_dir)  # the run directory resolves to sft/hf
    again.attach_data(make_dm(run_dir))
    a = model.recommend([prompt], None, 10)[0]
    b = again.recommend([prompt], None, 10)[0]
    assert torch.equal(a, b)


def test_checkpoint_round_trip_without_data(trained, tmp_path):
    run_dir, _, model, tr, _ = trained
    ckpt = tmp_path / "sft.ckpt"
    tr.save_checkpoint(ckpt)
    loaded = GenerativeRecommender.load_from_checkpoint(ckpt, map_location="cpu")
    x = torch.tensor([[loaded.tokenizer.bos_token_id] + loaded.item_tokens[3].tolist()])
    model.model.eval()
    loaded.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=x).logits, model.model(input_ids=x).logits)
    assert torch.equal(loaded.item_tokens, model.item_tokens)


@pytest.mark.parametrize("new_tokens", ["modules_to_save", "trainable_token_indices"])
def test_lora_adapter_round_trip_through_peft(tmp_path, new_tokens):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scid_map().save(tmp_path / "tokenizer")
    L.seed_everything(0, verbose=False)
    dm = make_dm(tmp_path, max_users=10, tasks={"seqrec": 1.0})
    backbone = {**TINY, "finetuning": "lora"}
    model = GenerativeRecommender(run_dir=str(tmp_path), backbone=backbone, lr=1e-2,
                                  lora={"r": 4, "alpha": 8, "dropout": 0.0,
                                        "new_tokens": new_tokens})
    tr = trainer(limit_train_batches=3, limit_val_batches=0)
    tr.fit(model, datamodule=dm)
    assert hasattr(model.model, "peft_config")
    model.export_artifacts()
    hf = tmp_path / "sft" / "hf"
    assert (hf / "adapter_config.json").exists() and (hf / "base" / "config.json").exists()
    tok = AutoTokenizer.from_pretrained(hf)
    base = AutoModelForCausalLM.from_pretrained(hf / "base")
    base.resize_token_embeddings(len(tok))
    plain = PeftModel.from_pretrained(base, hf).eval()
    x = torch.tensor([[tok.bos_token_id] + model.item_tokens[5].tolist()])
    model.model.eval()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, model.model(input_ids=x).logits,
                              atol=1e-5)
    again = GenerativeRecommender.from_pretrained_dir(hf)
    assert hasattr(again.model, "peft_config")
    with torch.no_grad():
        assert torch.allclose(again.model.eval()(input_ids=x).logits,
                              model.model(input_ids=x).logits, atol=1e-5)


def test_fit_validates_a_seeded_user_sample_and_validate_uses_every_user(tmp_path):
    from callbacks.timing import StageTimer

    scid_map().save(tmp_path / "tokenizer")
    L.seed_everything(0, verbose=False)
    dm = make_dm(tmp_path, val_max_users=12, group_by_length=True)
    model = GenerativeRecommender(run_dir=str(tmp_path), backbone=TINY, lr=3e-3)
    timer = StageTimer()
    tr = trainer(limit_train_batches=2, max_epochs=2, callbacks=[timer])
    tr.fit(model, datamodule=dm)
    sample = dm.fit_validation_rows()
    assert len(sample) == 12 and len(set(sample.tolist())) == 12
    assert sample.tolist() == make_dm(tmp_path, val_max_users=12).fit_validation_rows().tolist()
    assert sample.tolist() != list(range(12))               # a random sample, not the first N
    tr.validate(model, datamodule=dm, verbose=False)
    assert timer.eval_users == {"fit_validation": 2 * 12, "validate": MAX_USERS}
    with pytest.raises(ValueError, match="val_max_users"):
        make_dm(tmp_path, val_max_users=0)


def test_a_kill_before_the_export_leaves_the_stage_incomplete(tmp_path, monkeypatch):
    """Through the pipeline's stage runner: when the export dies after fit/validate/test, no
    stage.json claims the stage complete (the test loop writes metrics.json only)."""
    from pathlib import Path

    from cli import run_stage

    scid_map().save(tmp_path / "tokenizer")
    config = Path(__file__).resolve().parent.parent / "configs" / "ml100k" / "sft.yaml"
    flags = [f"--data.init_args.max_users={MAX_USERS}", "--trainer.max_epochs=1",
             "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
             "--trainer.limit_test_batches=1", "--trainer.accelerator=cpu",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
             # a synthetic SCID map: no tokenizer checkpoint whose codebooks could start the LM
             "--model.init_args.scid_init=random",
             *[f"--model.init_args.backbone.{k}={v}" for k, v in TINY.items()]]

    def killed(self, *a, **k):
        raise KeyboardInterrupt("killed during export")

    monkeypatch.setattr(GenerativeRecommender, "export_artifacts", killed)
    with pytest.raises(KeyboardInterrupt):
        run_stage("sft", str(config), tmp_path, flags)
    assert (tmp_path / "sft" / "metrics.json").exists()
    assert not (tmp_path / "sft" / "stage.json").exists()


def test_cli_predict_writes_where_output_says_and_honours_overrides(trained, tmp_path, capsys):
    from cli import Align3CLI

    run_dir, _, _, tr, _ = trained
    ckpt = tmp_path / "model.ckpt"
    tr.save_checkpoint(ckpt)
    out = tmp_path / "elsewhere" / "top3.jsonl"
    config = Path(__file__).resolve().parent.parent / "configs" / "ml100k" / "sft.yaml"
    Align3CLI(args=["predict", "--config", str(config), "--ckpt_path", str(ckpt),
                    "--output", str(out), f"--model.init_args.run_dir={run_dir}",
                    f"--data.init_args.run_dir={run_dir}",
                    f"--data.init_args.max_users={MAX_USERS}",
                    "--model.init_args.predict_top_k=3", "--trainer.accelerator=cpu",
                    "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                    *[f"--model.init_args.backbone.{k}={v}" for k, v in TINY.items()]])
    lines = out.read_text().splitlines()
    assert len(lines) == MAX_USERS and len(json.loads(lines[0])["items"]) == 3
    assert f"predictions: {out}" in capsys.readouterr().out


def test_ema_lever_tests_and_exports_the_averaged_weights(tmp_path):
    """configs/ablations/sft_ema.yaml through the pipeline's stage runner: the best checkpoint
    holds the EMA weights (the raw ones beside them), and the exported HF model is the EMA one."""
    from transformers import AutoModelForCausalLM

    from cli import run_stage

    root = Path(__file__).resolve().parent.parent
    scid_map().save(tmp_path / "tokenizer")
    flags = ["--config", str(root / "configs" / "ablations" / "sft_ema.yaml"),
             f"--data.init_args.max_users={MAX_USERS}", "--trainer.max_epochs=1",
             "--trainer.limit_train_batches=6", "--trainer.limit_val_batches=1",
             "--trainer.limit_test_batches=1", "--trainer.accelerator=cpu",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
             "--trainer.check_val_every_n_epoch=1", "--model.init_args.scid_init=random",
             *[f"--model.init_args.backbone.{k}={v}" for k, v in TINY.items()]]
    run_stage("sft", str(root / "configs" / "ml100k" / "sft.yaml"), tmp_path, flags)
    ckpt = torch.load(tmp_path / "sft" / "checkpoints" / "best.ckpt", weights_only=False)
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == raw.keys()
    moved = [k for k in averaged if averaged[k].is_floating_point()
             and not torch.equal(averaged[k], raw[k])]
    assert moved, "the EMA weights equal the raw ones: nothing was averaged"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "hf").state_dict()
    key = next(k for k in moved if k.removeprefix("model.") in hf)
    assert torch.equal(hf[key.removeprefix("model.")], averaged[key])
    assert not torch.equal(hf[key.removeprefix("model.")], raw[key])


def test_evaluation_batches_users_by_history_length_without_changing_metrics(trained,
                                                                              monkeypatch):
    _, dm, model, tr, _ = trained
    for stage, loader in (("valid", dm.val_dataloader()), ("test", dm.test_dataloader())):
        rows = torch.cat([b["rows"] for b in loader]).tolist()
        assert sorted(rows) == list(range(MAX_USERS))          # every user once
        hist = [min(len(dm.split.history(r, stage)), dm.max_history) for r in rows]
        assert hist == sorted(hist, reverse=True)              # longest histories first
    predict_rows = torch.cat([b["rows"] for b in dm.predict_dataloader()]).tolist()
    assert predict_rows == list(range(MAX_USERS))              # predictions keep user order
    # The metrics and the per-user ranks are those of the users in their own order.
    by_length = tr.test(model, datamodule=dm, verbose=False)[0]
    sorted_ranks = model.last_ranks["test"]
    monkeypatch.setattr(SFTDataModule, "by_prompt_length", lambda self, rows, stage: rows)
    plain = tr.test(model, datamodule=dm, verbose=False)[0]
    assert plain == pytest.approx(by_length, abs=1e-6)
    rows, ranks = model.last_ranks["test"]
    assert torch.equal(rows, sorted_ranks[0]) and torch.equal(ranks, sorted_ranks[1])


def _alignment_items(ds, task: str) -> set:
    return {spec for t, spec in ds.specs if t == task}


def test_task_draws_per_epoch_cover_the_catalogue_and_keep_the_epoch_size(tmp_path):
    scid_map().save(tmp_path / "tokenizer")
    fixed = make_dm(tmp_path)
    draws = make_dm(tmp_path, task_draws="epoch")
    # fixed: the same items in every epoch
    assert fixed.train_dataset(epoch=0).specs == fixed.train_dataset(epoch=5).specs
    d0, d1 = draws.train_dataset(epoch=0), draws.train_dataset(epoch=1)
    assert d0.counts == d1.counts == fixed.train_dataset().counts
    a0, a1 = _alignment_items(d0, "item2index"), _alignment_items(d1, "item2index")
    assert len(a0) == len(a1) == d0.counts["item2index"] and a0 != a1
    # seeded: the same epoch draws the same examples
    assert make_dm(tmp_path, task_draws="epoch").train_dataset(epoch=1).specs == d1.specs
    covered = set().union(*(_alignment_items(draws.train_dataset(epoch=e), "item2index")
                            for e in range(8)))
    assert len(covered) > 4 * d0.counts["item2index"]
    with pytest.raises(ValueError, match="task_draws"):
        make_dm(tmp_path, task_draws="each")


@pytest.mark.parametrize("option", [{"task_draws": "epoch"},
                                    {"task_schedule": "align_first"}])
def test_a_fit_with_per_epoch_examples_trains_each_epochs_examples(tmp_path, option):
    scid_map().save(tmp_path / "tokenizer")
    L.seed_everything(0, verbose=False)
    dm = make_dm(tmp_path, **option)
    model = GenerativeRecommender(run_dir=str(tmp_path), backbone=TINY, lr=3e-3)
    tr = trainer(limit_train_batches=2, limit_val_batches=0, max_epochs=2,
                 reload_dataloaders_every_n_epochs=1)
    tr.fit(model, datamodule=dm)
    last = tr.train_dataloader.dataset
    epoch1 = dm.train_dataset(epoch=1, num_epochs=2).specs
    assert last.specs == epoch1 != dm.train_dataset(epoch=0, num_epochs=2).specs
    # Without the reload the trainer would train epoch 0's examples throughout: a clear error.
    dm = make_dm(tmp_path, **option)
    model = GenerativeRecommender(run_dir=str(tmp_path), backbone=TINY, lr=3e-3)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        trainer(limit_train_batches=2, limit_val_batches=0).fit(model, datamodule=dm)


def test_align_first_schedule_keeps_the_fits_examples_and_orders_alignment_first(tmp_path):
    scid_map().save(tmp_path / "tokenizer")
    epochs = 4
    for draws in ("fixed", "epoch"):
        mixed = make_dm(tmp_path, task_draws=draws)
        sched = make_dm(tmp_path, task_draws=draws, task_schedule="align_first")
        mixed_specs = [s for e in range(epochs) for s in mixed.train_dataset(e).specs]
        parts = [sched.train_dataset(e, num_epochs=epochs).specs for e in range(epochs)]
        # The fit trains the same examples, in epochs of (almost) the same size ...
        assert sorted(s for p in parts for s in p) == sorted(mixed_specs)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        # ... alignment first: once a next-item example appears, no alignment example follows.
        kinds = [t == "seqrec" for p in parts for t, _ in p]
        first = kinds.index(True)
        assert first > 0 and all(kinds[first:])
        assert set(t for t, _ in parts[0]) != {"seqrec"} and {t for t, _ in parts[-1]} == {
            "seqrec"}
    with pytest.raises(ValueError, match="task_schedule"):
        make_dm(tmp_path, task_schedule="align_last")
    with pytest.raises(ValueError, match="max_epochs"):
        make_dm(tmp_path, task_schedule="align_first").train_dataset(0)
