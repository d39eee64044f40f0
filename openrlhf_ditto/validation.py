"""Judge-free model selection: what DITTO's own implicit reward says about demos it never trained on.

DPO's implicit reward r(x, y) = beta * (log pi_t(y|x) - log pi_ref(y|x)) ranks the user's demos above the policy's
samples on the prompts it trains on by construction. On held-out demos (--ditto.val_demos K, the last K demos
kept out of training, or --ditto.val_dataset, the user's own held-out examples) it says whether that ranking
generalises. After each iteration, for pi_t:
  margin            mean over held-out prompts of r(demo) - mean r(pi_t's own samples of that prompt)
  acc               share of (demo, sample) pairs of the same prompt with r(demo) > r(sample)
  demo_reward, sample_reward   the two means
  demo_logp_per_token          log pi_t(demo | x) per token: how likely the held-out demos are
pi_0 is the reference, so its margin is 0 by definition; only its log-likelihood is measured.
`SELECT` is the metric the end of a run compares with pi_0's. On real authors (README, "Does DITTO beat SFT?")
neither metric tracked the style judge: both fell at every iteration, also where the judge preferred DITTO.
"""

import torch

from openrlhf_ditto.pairs import collate

SELECT = "margin"


def held_out_signal(
    backend,
    prompts: list[torch.Tensor],
    demos: list[torch.Tensor],
    n: int,
    beta: float,
    pad: int,
    micro_batch_size: int,
    seed: int,
) -> dict[str, float]:
    """The signal of the backend's current policy on held-out (prompt, demo) pairs; `n` samples per prompt (0: the
    log-likelihood only, for pi_0). Sampling is seeded with `seed` and leaves the run's random state as it was, so
    a run samples and trains the same with or without validation."""

    def logps(score, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        chunks = [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
        return score([collate([p for p, _ in c], [r for _, r in c], pad) for c in chunks])

    demo_rows = list(zip(prompts, demos))
    policy_demo = logps(backend.policy_logps, demo_rows)
    lengths = torch.tensor([len(d) for d in demos], dtype=torch.float32)
    signal = {"demo_logp_per_token": (policy_demo / lengths).mean().item()}
    if n == 0:
        return {**signal, "margin": 0.0}
    # CUDA's RNG too only where this process already uses CUDA: forking it initialises CUDA (in the Ray driver, a
    # context on a GPU the roles need)
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        torch.manual_seed(seed)
        samples = backend.generate(prompts, n)
    sample_rows = [(p, torch.tensor(s, dtype=torch.long)) for p, group in zip(prompts, samples) for s in group]
    sample_reward = beta * (logps(backend.policy_logps, sample_rows) - logps(backend.reference_logps, sample_rows))
    sample_reward = sample_reward.view(len(prompts), n)
    demo_reward = beta * (policy_demo - logps(backend.reference_logps, demo_rows))
    signal.update(
        margin=(demo_reward - sample_reward.mean(1)).mean().item(),
        acc=(demo_reward[:, None] > sample_reward).float().mean().item(),
        demo_reward=demo_reward.mean().item(),
        sample_reward=sample_reward.mean().item(),
    )
    return signal
