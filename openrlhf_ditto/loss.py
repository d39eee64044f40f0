"""DittoActorLoss: DPO on ranked pairs against the frozen reference, with metrics per pair kind."""

import torch
import torch.nn.functional as F
from torch import nn

from openrlhf_ditto.pairs import KINDS, PairBatch, SequenceBatch


class DittoActorLoss(nn.Module):
    """The DPO loss of `openrlhf.models.loss.DPOLoss` (same beta and cDPO label smoothing), plus an optional NLL term
    on the demos' tokens (`nll_coef`, mean per-token NLL of the chosen demos), and metrics per kind.

    IPO compares per-token mean log-probs, as TRL's IPO (which the official DITTO code runs) and the IPO paper do:
    on sums, as OpenRLHF's DPOLoss takes them, its target margin 1/(2 beta) would mean more for a short response
    than for a long one. The metrics (rewards, margins) are DPO's, on sums, whichever the loss.

    Both terms are means over the whole batch. Under gradient accumulation a micro-batch passes the batch's counts
    (`num_pairs`, `num_demos`), so that the gradients of its micro-batches add up to the batch's gradient however
    the batch is split; by default the counts are the given rows'."""

    def __init__(self, beta: float = 0.05, label_smoothing: float = 0.0, ipo: bool = False, nll_coef: float = 0.0):
        super().__init__()
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.ipo = ipo
        self.nll_coef = nll_coef

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
        kinds: torch.Tensor,
        chosen_lengths: torch.Tensor | None = None,
        chosen_is_demo: torch.Tensor | None = None,
        num_pairs: int | None = None,
        num_demos: int | None = None,
        rejected_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.ipo:  # Eq. 17 of arXiv 2310.12036, on per-token means
            if chosen_lengths is None or rejected_lengths is None:
                raise ValueError("IPO compares per-token log-probs: give chosen_lengths and rejected_lengths")
            logits = (policy_chosen_logps / chosen_lengths - policy_rejected_logps / rejected_lengths) - (
                reference_chosen_logps / chosen_lengths - reference_rejected_logps / rejected_lengths
            )
            losses = (logits - 1 / (2 * self.beta)) ** 2
        else:  # label_smoothing = 0 is the original DPO; > 0 is conservative DPO
            logits = (policy_chosen_logps - policy_rejected_logps) - (
                reference_chosen_logps - reference_rejected_logps
            )
            losses = (
                -F.logsigmoid(self.beta * logits) * (1 - self.label_smoothing)
                - F.logsigmoid(-self.beta * logits) * self.label_smoothing
            )
        loss = losses.sum() / (num_pairs or len(losses))
        metrics = {"dpo_loss": loss.item()}
        if self.nll_coef > 0 and chosen_is_demo is not None and chosen_is_demo.any():
            nll = -(policy_chosen_logps / chosen_lengths)[chosen_is_demo].sum() / (num_demos or chosen_is_demo.sum())
            loss = loss + self.nll_coef * nll
            metrics["demo_nll"] = nll.item()

        chosen_rewards = self.beta * (policy_chosen_logps - reference_chosen_logps).detach()
        rejected_rewards = self.beta * (policy_rejected_logps - reference_rejected_logps).detach()
        margins = chosen_rewards - rejected_rewards
        metrics.update(loss=loss.item(), acc=(margins > 0).float().mean().item(), margin=margins.mean().item())
        # how far the policy has moved, a cheap live signal (trainer.py warns when it is no more than numerics)
        policy = torch.cat([policy_chosen_logps, policy_rejected_logps]).detach()
        reference = torch.cat([reference_chosen_logps, reference_rejected_logps])
        metrics["logratio_abs"] = (policy - reference).abs().mean().item()
        for k, name in enumerate(KINDS):
            mask = kinds == k
            n = int(mask.sum())
            metrics[f"{name}/count"] = n
            if n:
                metrics[f"{name}/loss"] = losses.detach()[mask].mean().item()
                metrics[f"{name}/acc"] = (margins[mask] > 0).float().mean().item()
                metrics[f"{name}/margin"] = margins[mask].mean().item()
                metrics[f"{name}/chosen_reward"] = chosen_rewards[mask].mean().item()
                metrics[f"{name}/rejected_reward"] = rejected_rewards[mask].mean().item()
        return loss, metrics

    def on_pairs(
        self, logps: torch.Tensor, batch: PairBatch, num_pairs: int | None = None, num_demos: int | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of a pair batch given its rows' policy log-probs (chosen rows, then rejected rows); a
        micro-batch passes its whole batch's pair and demo counts."""
        B = len(batch.kinds)
        return self(
            logps[:B],
            logps[B:],
            batch.ref_logps[:B],
            batch.ref_logps[B:],
            batch.kinds,
            batch.action_mask[:B].sum(-1),
            batch.chosen_is_demo,
            num_pairs,
            num_demos,
            batch.action_mask[B:].sum(-1),
        )


def sequence_logps(model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Sum of log p(response token | prefix) per row, for an HF causal LM, in fp32.

    Positions come from the attention mask as in OpenRLHF's `Actor.forward`, so left padding changes nothing.
    Only the response positions' logits are computed (`logits_to_keep`), which spares the full-vocabulary
    projection of every prompt token.
    """
    R = batch.action_mask.shape[1]
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = (
        model(batch.sequences, attention_mask=batch.attention_mask, position_ids=position_ids, logits_to_keep=R + 1)
        .logits[:, :-1]
        .float()
    )
    targets = batch.sequences[:, -R:]
    # log_softmax(x)[y] = x[y] - logsumexp(x), without a second vocabulary-sized tensor
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * batch.action_mask).sum(-1)


def train_without_dropout(model: nn.Module) -> None:
    """Ready the policy for a DITTO step with every dropout off, as the official DITTO code trains (TRL's
    `disable_dropout`): the cached reference log-probs are scored in eval mode, so a policy in train mode would see
    a DPO margin before learning anything (0.33-1.05 nats per sequence on a tiny GPT-2 with dropout 0.1). Eval mode
    turns off every architecture's dropouts (modules, attention, LoRA's); gradients flow the same. Under gradient
    checkpointing, which HF runs only in train mode, the modules it is enabled on (the layers, and the model that
    then keeps no KV cache) go back to train mode alone: their submodules, where the dropouts are, stay in eval (a
    layer that drops out in its own forward, as OPT's residual dropout, still does)."""
    model.eval()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True
