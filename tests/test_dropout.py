"""Dropout is off in DITTO's steps, as in the official code (TRL's disable_dropout): the reference log-probs are
cached in eval mode, so a policy trained in train mode would see a DPO margin before it learned anything (0.33-1.05
nats per sequence measured on a tiny GPT-2 with dropout 0.1 and policy == reference). Both backends' steps, on a
tiny GPT-2 whose every dropout is 0.1: at step 0, policy == reference, every pair's margin is 0."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from openrlhf_ditto.backends.local import LocalBackend
from openrlhf_ditto.cli.args import hierarchize
from openrlhf_ditto.cli.main import build_parser
from openrlhf_ditto.pairs import PairSampler, collate_pairs
from openrlhf_ditto.store import DEMO, Response, SampleStore

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpt2_path(tiny_model_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2-dropout")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=128,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pair_batch(score) -> "PairBatch":  # noqa: F821
    g = torch.Generator().manual_seed(0)
    demos = [Response(p, torch.randint(5, 300, (12,), generator=g), 0.0, False, DEMO) for p in range(3)]
    store = SampleStore([torch.randint(5, 300, (n,), generator=g).tolist() for n in (6, 9, 4)], demos)
    store.add_iteration(
        [Response(p, torch.randint(5, 300, (n,), generator=g), 0.0, False, 0) for p in range(3) for n in (10, 15)]
    )
    batch = collate_pairs(PairSampler(store, seed=0).sample(6), store, pad_token_id=0)
    batch.ref_logps = score(batch)
    return batch


@pytest.mark.parametrize(
    "flags",
    [
        ["--ds.lora.rank", "0"],
        ["--ds.lora.rank", "0", "--actor.gradient_checkpointing_enable"],
        [
            "--ds.lora.rank",
            "4",
            "--ds.lora.alpha",
            "8",
            "--ds.lora.dropout",
            "0.1",
            "--ds.lora.target_modules",
            "c_attn",
        ],
    ],
    ids=["full", "full-checkpointing", "lora-dropout"],
)
def test_local_step_sees_no_margin_at_step_0(gpt2_path, flags):
    argv = ["train", "--actor.model_name_or_path", str(gpt2_path), "--data.dataset", "d.jsonl", "--train.batch_size",
            "6", "--train.micro_batch_size", "3", "--rollout.engine", "torch", *flags]  # fmt: skip
    backend = LocalBackend(gpt2_path, hierarchize(build_parser().parse_args(argv)))
    backend.add_run("")
    backend.freeze_reference("", None)
    torch.manual_seed(0)
    batch = pair_batch(lambda b: backend.reference_logps([b], [[""] * len(b.sequences)]))
    metrics = backend.train_step({"": batch})[""]
    assert metrics["margin"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_openrlhf_policy_step_sees_no_margin_at_step_0(gpt2_path, monkeypatch):
    """DittoPolicyActor.ditto_train_step on one rank without Ray, its Actor and DeepSpeed stood in for (as in
    test_accumulation.py): the shard's policy log-probs are the reference's, scored in eval mode."""
    monkeypatch.setenv("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")  # openrlhf imports flash-attn (CPU install)
    ob = pytest.importorskip("openrlhf_ditto.backends.openrlhf")
    from openrlhf_ditto.loss import sequence_logps

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    model = GPT2LMHeadModel.from_pretrained(gpt2_path, dtype=torch.float32)

    class Actor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, sequences, action_mask, attention_mask):  # OpenRLHF's Actor: the actions' log-probs
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(sequences, attention_mask=attention_mask, position_ids=positions).logits.float()
            logps = logits[:, :-1].log_softmax(-1).gather(-1, sequences[:, 1:, None]).squeeze(-1)
            return logps[:, -action_mask.shape[1] :] * action_mask

    args = hierarchize(
        build_parser().parse_args(["train", "--actor.model_name_or_path", str(gpt2_path), "--data.dataset", "d.jsonl"])
    )
    strategy = SimpleNamespace(args=args, world_size=1, accumulated_gradient=1, get_grad_norm=lambda model: 0.0)
    strategy.backward = lambda loss, model, optimizer: loss.backward()
    strategy.optimizer_step = lambda *a, **k: None
    actor = object.__new__(ob.DittoPolicyActor.__ray_actor_class__)
    actor.strategy, actor.actor, actor.actor_optim = strategy, Actor(), None
    actor.actor_scheduler = SimpleNamespace(get_last_lr=lambda: [0.0])
    with torch.no_grad():
        batch = pair_batch(lambda b: sequence_logps(model.eval(), b))
    torch.manual_seed(0)
    out = actor.ditto_train_step(batch, total_pairs=len(batch.kinds), total_demos=int(batch.chosen_is_demo.sum()))
    torch.testing.assert_close(torch.cat([out["chosen_logps"], out["rejected_logps"]]), batch.ref_logps)
