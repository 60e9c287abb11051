"""The LAPA vision-language-action model (stages 2-3): configuration, model, action bins, the IDM of
the VPT baseline, and the policy object the policy server runs.

Importing this package loads torch but not transformers; transformers is imported when a model is built."""

from lapa_training.vla.action_bins import ACTION_NAMES, IGNORE_INDEX, ActionBins
from lapa_training.vla.configuration_vla import VLAConfig
from lapa_training.vla.modeling_idm import IDMConfig, IDMModel, IDMOutput
from lapa_training.vla.modeling_vla import LoadReport, VLABuildError, VLAModel, VLAOutput, byte_tokenizer

__all__ = ["ACTION_NAMES", "IGNORE_INDEX", "ActionBins", "IDMConfig", "IDMModel", "IDMOutput", "LoadReport",
           "VLABuildError", "VLAConfig", "VLAModel", "VLAOutput", "VLAPolicy", "byte_tokenizer"]


def __getattr__(name):  # VLAPolicy lazily: it imports lapa_core.policy
    if name == "VLAPolicy":
        from lapa_training.vla.policy import VLAPolicy

        return VLAPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
