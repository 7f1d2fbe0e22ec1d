"""How a model reads 3-D inputs: (B, C, L) signals (channels first, steps along the last dim) or
(B, T, D) sequences (steps along dim 1, features last).

Torch's convolutions read (B, C, L); recurrent, attention and linear layers read (B, T, D). Methods
that group, mask or tile positions (RISE, Sobol, HSIC, meaningful perturbation, CD, ACD, the
interaction groups) need to know which dim holds the steps. :func:`reads_channels_first` decides from
the model's first layer, unless the user says so (``channels_first=True/False`` on those methods);
:class:`StepsLast` lets the methods written for (B, C, L) explain a (B, T, D) model unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["StepsLast", "check_channels_first", "reads_channels_first"]

#: layers that read the last dim of a 3-D input as features (one vector per step)
_STEP_LAYERS = (
    nn.RNNBase,
    nn.Linear,
    nn.MultiheadAttention,
    nn.LayerNorm,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.Transformer,
    nn.TransformerEncoder,
)
#: layers that read dim 1 of a 3-D input as channels
_CHANNEL_LAYERS = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d, nn.GroupNorm)


def _step_width(m: nn.Module) -> int | None:
    """The feature width a step-reading layer expects in the last dim (None if unknown)."""
    if isinstance(m, nn.RNNBase):
        return int(m.input_size)
    if isinstance(m, nn.Linear):
        return int(m.in_features)
    if isinstance(m, nn.MultiheadAttention):
        return int(m.embed_dim)
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[-1])
    if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return int(m.self_attn.embed_dim)
    if isinstance(m, nn.TransformerEncoder):
        return int(m.layers[0].self_attn.embed_dim)
    if isinstance(m, nn.Transformer):
        return int(m.d_model)
    return None


def check_channels_first(setting: bool | None) -> bool | None:
    """``setting`` if it is None or a bool; otherwise a ValueError naming the choices."""
    if setting is None or isinstance(setting, bool):
        return setting
    raise ValueError(
        f"channels_first must be True ((B, C, L) signals), False ((B, T, D) sequences) or None (decided from "
        f"the model's first layer), got {setting!r}."
    )


def reads_channels_first(model: object, inputs: Tensor, setting: bool | None = None) -> bool:
    """Whether the 3-D ``inputs`` are (B, C, L) signals for ``model`` (False: (B, T, D) sequences).

    ``setting`` (True/False) decides when given. Otherwise the first layer that shows how the input
    is read decides, in registration order: a ``Conv1d``, ``BatchNorm1d``, ``InstanceNorm1d`` or
    ``GroupNorm`` reads channels first; a recurrent, attention, ``Linear`` or ``LayerNorm`` layer
    whose width is the last dim reads (B, T, D) (a ``Linear`` of width C·L after a flatten reads
    signals). Models showing neither, and inputs with one channel or step (B, 1, L), are read as
    (B, C, L), torch's convention. Inputs that are not 3-D give False.
    """
    if inputs.ndim != 3:
        return False
    if setting is not None:
        return bool(setting)
    if inputs.shape[1] == 1 or not isinstance(model, nn.Module):
        return True
    width = int(inputs.shape[-1])
    for m in model.modules():
        if isinstance(m, _CHANNEL_LAYERS):
            return True
        if isinstance(m, _STEP_LAYERS):
            return _step_width(m) != width
    return True


class StepsLast(nn.Module):
    """A view of a (B, T, D) model that takes (B, D, T) inputs, so methods built for (B, C, L)
    signals mask and group the T steps (shared over the D features). Holds no state of its own: mode,
    parameters and hooks are the wrapped model's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.training = model.training  # mirror the mode without calling train()/eval() on the model

    def forward(self, x: Tensor) -> object:
        return self.inner(x.transpose(1, 2))
