"""The training modes: how fine-tuning trains, the values ``--joint`` takes. One registered object per mode,
its module in :mod:`convae.training` registering it: ``off`` (supervised, :mod:`convae.training.supervised`),
``plain`` and ``gamma`` (joint, :mod:`convae.training.joint`). The registry lives here, below the training
code, because the config's ``--joint`` choices are its names.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..utils.errors import ConvaeError


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

    def describe(self, cfg: Any, labelled: int, batches: Any) -> str:
        """The log's line about what the phase trains on."""
        return f"{self.name} training: the {labelled} labelled images beside {batches.describe()}"


TRAINING_MODES: dict[str, TrainingMode] = {}


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
