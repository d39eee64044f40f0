"""Gradient accumulation: a DITTO step's gradient (DPO term and --ditto.nll_coef's demo NLL) is the whole batch's,
however --train.micro_batch_size splits it, in the local backend and in the OpenRLHF policy role's step
(`DittoPolicyActor.ditto_train_step`, run here on one rank without Ray, with DeepSpeed's accumulation arithmetic
stood in for: each backward divided by the accumulation steps, gradients summed). The review measured the demo NLL
at 5.87 for a full batch, 5.76 in micro-batches of 3 and 4.19 in micro-batches of 2."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from openrlhf_ditto.backends.local import LocalBackend
from openrlhf_ditto.cli.args import hierarchize
from openrlhf_ditto.cli.main import build_parser
from openrlhf_ditto.pairs import PairSampler, collate_pairs
from openrlhf_ditto.store import DEMO, Response, SampleStore

SIZES = (1, 2, 3, 6)  # micro-batch sizes that divide the batch of 6 pairs, as OpenRLHF requires


def train_args(model, micro: int) -> SimpleNamespace:
    argv = ["train", "--actor.model_name_or_path", str(model), "--data.dataset", "demos.jsonl", "--ds.lora.rank", "0",
            "--ditto.nll_coef", "0.7", "--train.batch_size", "6", "--train.micro_batch_size", str(micro),
            "--actor.max_norm", "1e9"]  # fmt: skip
    return hierarchize(build_parser().parse_args(argv))


@pytest.fixture(scope="module")
def batch():
    """6 pairs of two iterations: online and replay pairs have a demo as chosen, inter-model ones do not, so
    micro-batches hold different numbers of demo rows (and of tokens)."""
    g = torch.Generator().manual_seed(0)
    demos = [Response(p, torch.randint(3, 300, (n,), generator=g), 0.0, False, DEMO) for p, n in ((0, 6), (1, 9))]
    store = SampleStore([torch.randint(3, 300, (n,), generator=g).tolist() for n in (4, 7)], demos)
    for t in range(2):
        store.add_iteration(
            [Response(p, torch.randint(3, 300, (n,), generator=g), 0.0, False, t) for p in range(2) for n in (3, 8)]
        )
    batch = collate_pairs(PairSampler(store, (0.5, 0.17, 0.33), seed=1).sample(6), store, pad_token_id=0)
    batch.ref_logps = -torch.rand(12, generator=g) * 20
    demos_per_half = [int(batch.chosen_is_demo[i : i + 3].sum()) for i in (0, 3)]
    assert len(batch.kinds) == 6 and demos_per_half[0] != demos_per_half[1], demos_per_half
    return batch


def local_gradient(model_path, batch, micro: int) -> dict[str, torch.Tensor]:
    backend = LocalBackend(model_path, train_args(model_path, micro))
    backend.add_run("")
    backend.freeze_reference("", None)
    grads = {}

    def capture(optimizer, args, kwargs):
        grads.update({n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None})

    backend.optimizers[""][0].register_step_pre_hook(capture)
    backend.train_step({"": batch})
    return grads


def actor_gradient(model_path, batch, micro: int, monkeypatch) -> dict[str, torch.Tensor]:
    monkeypatch.setenv("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")  # openrlhf imports flash-attn (CPU install)
    from openrlhf_ditto.backends import openrlhf as ob

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    class Actor(torch.nn.Module):
        """OpenRLHF's Actor.forward(sequences, action_mask, attention_mask): the action positions' log-probs."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, sequences, action_mask, attention_mask):
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(sequences, attention_mask=attention_mask, position_ids=positions).logits.float()
            logps = logits[:, :-1].log_softmax(-1).gather(-1, sequences[:, 1:, None]).squeeze(-1)
            return logps[:, -action_mask.shape[1] :] * action_mask

    class DeepSpeedArithmetic:
        """One rank of DeepSpeed's engine: backward divides by the accumulation steps; steps only at the end."""

        def __init__(self, args):
            self.args, self.world_size = args, 1
            self.accumulated_gradient = args.train.batch_size // args.train.micro_batch_size

        def backward(self, loss, model, optimizer):
            (loss / self.accumulated_gradient).backward()

        def optimizer_step(self, *args, **kwargs):
            pass

        def get_grad_norm(self, model):
            return 0.0

    actor = object.__new__(ob.DittoPolicyActor.__ray_actor_class__)
    actor.strategy = DeepSpeedArithmetic(train_args(model_path, micro))
    actor.actor, actor.actor_optim = Actor(), None
    actor.actor_scheduler = SimpleNamespace(get_last_lr=lambda: [0.0])
    actor.ditto_train_step(batch, total_pairs=len(batch.kinds), total_demos=int(batch.chosen_is_demo.sum()))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7, msg=name)


def test_local_step_gradient_does_not_depend_on_the_micro_batch_size(tiny_model_path, batch, one_thread):
    whole = local_gradient(tiny_model_path, batch, 6)
    for micro in SIZES[:-1]:
        assert_same(local_gradient(tiny_model_path, batch, micro), whole)


def test_openrlhf_policy_step_gradient_is_the_local_one_for_any_split(tiny_model_path, batch, one_thread, monkeypatch):
    whole = local_gradient(tiny_model_path, batch, 6)
    for micro in SIZES:
        assert_same(actor_gradient(tiny_model_path, batch, micro, monkeypatch), whole)
