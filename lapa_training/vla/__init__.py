"""The LAPA vision-language-action model (stages 2-3): configuration, backbones, processor (images,
instructions, action bins), model, the IDM of the VPT baseline, and the policy object the policy
server runs.

Importing this package loads torch but not transformers; transformers is imported when a model is built."""

from lapa_training.vla.action_bins import ACTION_NAMES, IGNORE_INDEX, ActionBins
from lapa_training.vla.backbones import VLABuildError, byte_tokenizer
from lapa_training.vla.configuration_vla import VLAConfig, migrate_vla_config
from lapa_training.vla.modeling_idm import IDMConfig, IDMModel, IDMOutput
from lapa_training.vla.modeling_vla import LoadReport, VLAModel, VLAOutput
from lapa_training.vla.processor_vla import VLAProcessor

__all__ = ["ACTION_NAMES", "IGNORE_INDEX", "ActionBins", "IDMConfig", "IDMModel", "IDMOutput", "LoadReport",
           "VLABuildError", "VLAConfig", "VLAModel", "VLAOutput", "VLAPolicy", "VLAProcessor", "byte_tokenizer",
           "migrate_vla_config"]


def __getattr__(name):  # VLAPolicy lazily: it imports lapa_core.policy
    if name == "VLAPolicy":
        from lapa_training.vla.policy import VLAPolicy

        return VLAPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
