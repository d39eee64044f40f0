"""DITTO (Shaikh et al., arXiv 2406.00888) for OpenRLHF."""

import warnings

# torch.cuda imports pynvml, which OpenRLHF depends on and which warns on import that it is deprecated: nothing a
# user of this package can act on, and it would be the first line of every command.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)

from openrlhf_ditto.demos import Demo, load_demos, load_preference_pairs
from openrlhf_ditto.experience import DittoExperienceMaker
from openrlhf_ditto.loss import DittoActorLoss, sequence_logps
from openrlhf_ditto.pairs import KINDS, Pair, PairBatch, PairSampler, SequenceBatch, collate, collate_pairs
from openrlhf_ditto.store import Response, SampleStore

__version__ = "0.1.0"
__all__ = [
    "KINDS",
    "Demo",
    "DittoActorLoss",
    "DittoExperienceMaker",
    "Pair",
    "PairBatch",
    "PairSampler",
    "Response",
    "SampleStore",
    "SequenceBatch",
    "collate",
    "collate_pairs",
    "load_demos",
    "load_preference_pairs",
    "sequence_logps",
]
