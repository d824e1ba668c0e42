"""The training modes: how fine-tuning trains, the values ``--joint`` takes. One registered object per mode,
its module in :mod:`convae.training` registering it: ``off`` (supervised, :mod:`convae.training.supervised`),
``plain`` and ``gamma`` (joint, :mod:`convae.training.joint`), ``fixmatch``, ``flexmatch`` and ``freematch``
(consistency, :mod:`convae.training.consistency`). The registry and the modes' knobs live here, below the
training code, because the config's ``--joint`` choices are its names and ``Config`` holds the knobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..utils.errors import ConvaeError
from ..utils.knobs import Choice, Flag, Int, Num, knob


class TrainingMode:
    """A way to train the classifier in a fine-tuning phase or a sweep cell.

    ``build(...)`` returns ``(model, batches, criterion, labelled)``: the module the optimizer updates
    (the classifier, or a model around it), the batches an epoch walks, the criterion the loop calls
    (its loss, or a mapping of its loss and named terms, which the run records), and ``labelled(k)``,
    the labelled stream from its ``k``-th batch on beside every step, or None.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # what the sweep's tables call its method (joint_<name>), after "joint, "
    unlabelled: ClassVar[bool] = False  # its epochs are passes over every training image, labelled or not
    frozen_encoder: ClassVar[bool] = True  # it can train a head on a frozen encoder (--freeze-encoder)
    pretrained_method: ClassVar[str] = ""  # the sweep's method of it from the pretrained encoder (finetune_<name>)

    def build(
        self,
        clf: Any,
        labelled: Any,
        unlabelled: Any,
        classes: list[str],
        cfg: Any,
        device: Any,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        decoder: Any = None,
    ) -> tuple[Any, Any, Any, Any]:
        raise NotImplementedError  # pragma: no cover

    def check(self, cfg: Any) -> None:
        """Refuse, with :class:`ConvaeError`, a config this mode cannot train as asked (called by validation)."""

    def describe(self, cfg: Any, labelled: int, batches: Any) -> str:
        """The log's line about what the phase trains on."""
        return f"{self.name} training: the {labelled} labelled images beside {batches.describe()}"


TRAINING_MODES: dict[str, TrainingMode] = {}
MAX_WEIGHT = 1000  # a loss term weighed more than this against the cross-entropy swamps it: refused


def register_training_mode(cls: type[TrainingMode]) -> type[TrainingMode]:
    """Class decorator: ``--joint NAME`` trains with it (a second one of the same name replaces the first)."""
    TRAINING_MODES[cls.name] = cls()
    return cls


def unregister_training_mode(name: str) -> None:
    TRAINING_MODES.pop(name, None)


def mode_names() -> tuple[str, ...]:
    return tuple(TRAINING_MODES)


def training_mode(name: str) -> TrainingMode:
    try:
        return TRAINING_MODES[name]
    except (KeyError, TypeError):
        raise ConvaeError(f"unknown training mode {name!r}; choose one of {', '.join(TRAINING_MODES)}") from None


# ----------------------------------------------------------------------------- the modes' knobs (Config inherits them)


@dataclass(frozen=True)
class JointKnobs:
    """Semi-supervised training as the run config holds it (``Config`` inherits these fields)."""

    joint: str = knob(
        "off",
        Choice(mode_names),
        "semi-supervised fine-tuning: every step adds an unsupervised cost "
        "on a batch of the unlabelled images (an epoch is one pass over them) to the labelled batch's "
        "cross-entropy: plain (the --objective through the decoder), gamma (the Ladder's "
        "Gamma-model), or consistency training: fixmatch, flexmatch, freematch (a confident prediction on a "
        "weak view the label of a strong view); default off",
        group="finetune",
    )
    joint_weight: float = knob(
        1.0,
        Num(0, hi=MAX_WEIGHT),
        "--joint: weight of the unsupervised cost (default 1; 0 = supervised training; below 1000)",
        group="finetune",
        metavar="W",
    )
    joint_noise: float = knob(
        0.3,
        Num(0, hi=10),  # a std of 10 batch-norm units already drowns every signal; 1e30 trained to a loss of 5e27
        "--joint gamma: Gaussian noise std after every batch norm of the "
        "corrupted pass, and on its input relative to the pixels' std (default 0.3; below 10)",
        group="finetune",
        metavar="S",
    )
    joint_stop_grad: bool = knob(
        False,
        Flag(),
        "--joint gamma: no gradient through the clean pass's target (the Ladder's code lets it flow)",
        group="finetune",
    )


@dataclass(frozen=True)
class ConsistencyKnobs:
    """Consistency training (``--joint fixmatch|flexmatch|freematch``, :mod:`convae.training.consistency`)."""

    unlabelled_ratio: int = knob(
        7,
        Int(1, hi=64),
        "--joint fixmatch|flexmatch|freematch: unlabelled images per labelled image in a step (FixMatch's mu; "
        "default 7)",
        group="finetune",
        metavar="MU",
    )
    consistency_threshold: float = knob(
        0.95,
        Num(0, lo_open=True, hi=1),
        "--joint fixmatch|flexmatch: confidence a weak view's prediction needs to become its strong view's "
        "label (FlexMatch: the highest of its per-class thresholds; default 0.95)",
        group="finetune",
        metavar="T",
    )
    threshold_momentum: float = knob(
        0.999,
        Num(0, hi=1),
        "--joint freematch: decay of the moving averages its thresholds follow (default 0.999)",
        group="finetune",
        metavar="M",
    )
    fairness_weight: float = knob(
        0.001,
        Num(0, hi=MAX_WEIGHT),
        "--joint freematch: weight of its fairness term (default 0.001)",
        group="finetune",
        metavar="W",
    )
    reconstruction_weight: float = knob(
        0.0,
        Num(0, hi=MAX_WEIGHT),
        "--joint fixmatch|flexmatch|freematch: weight of the --objective on the unlabelled images' weak views "
        "through the decoder, beside the consistency cost (default 0 = off)",
        group="finetune",
        metavar="W",
    )
    strong_ops: int = knob(
        3,
        Int(1, hi=14),
        "--joint fixmatch|flexmatch|freematch: RandAugment operations per strong view (default 3)",
        group="finetune",
        metavar="N",
    )
    strong_cutout: float = knob(
        0.5,
        Num(0, hi=1),
        "--joint fixmatch|flexmatch|freematch: largest side of the strong view's Cutout, a fraction of the "
        "image's (default 0.5; 0 = off)",
        group="finetune",
        metavar="F",
    )
