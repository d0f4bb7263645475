"""Hugging Face conversion, both ways: GPT-2, Llama, Qwen3, Mixtral and Qwen3-MoE checkpoints
<-> meshlm `(ModelConfig, params)`.

    config = config_from_hf(hf_model.config, dtype="float32")
    params = params_from_hf(hf_model.state_dict(), config)
    logits = Transformer(config).apply({"params": params}, tokens)
    hf_config, state_dict = to_hf(config, params)      # config.json dict, numpy tensors

or `config, params = from_hf(hf_model)`. Nothing here imports torch or
transformers: a state dict may be any mapping of names to torch tensors or numpy
arrays (tools/import_hf.py passes one that reads safetensors files lazily), and
an HF config is read by attribute. Both directions read the same per-family
tables (model/hf_layout.py), so an import followed by an export gives back the
same tensors bit for bit. A mixture of experts' files hold one tensor per expert (export
writes those, as save_pretrained does); transformers 5 fuses them in memory, and import
reads either.
"""

import itertools
import re
import types
from collections.abc import Mapping
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from errors import UserError
from model.config import ModelConfig
from model.hf_layout import DIFFERENT_MOE, IGNORED, Family, Tensor, tensor_layout
from model.hf_layout import FAMILIES as BASE_FAMILIES
from model.hf_layout_windowed import WINDOWED_FAMILIES, sub_config
from model.transformer import Transformer


FAMILIES = {**BASE_FAMILIES, **WINDOWED_FAMILIES}


def _field(hf_config, name, default=None, aliases=None):
    value = getattr(hf_config, name, None)
    if value is None and aliases and name in aliases:
        value = getattr(hf_config, aliases[name], None)
    return default if value is None else value


def _family_of_hf(hf_config) -> Family:
    model_type = getattr(hf_config, "model_type", None)
    if model_type in DIFFERENT_MOE:
        raise UserError(
            f"Hugging Face model_type={model_type!r} is a mixture of experts that meshlm does "
            f"not compute: {DIFFERENT_MOE[model_type]}. meshlm converts "
            f"{' and '.join(f.architecture for f in FAMILIES.values() if f.moe)}."
        )
    if model_type not in FAMILIES:
        raise UserError(
            f"Unsupported Hugging Face model_type={model_type!r}; meshlm converts "
            f"{', '.join(map(repr, FAMILIES))}."
        )
    return FAMILIES[model_type]


def config_from_hf(hf_config, **overrides) -> ModelConfig:
    """The ModelConfig of an HF config (model/hf_layout.py's families); `overrides` set any
    other field."""
    family = _family_of_hf(hf_config)
    model_type = family.model_type
    # The plain keys; an encoder-decoder's in its nested (decoder) config.
    c = sub_config(hf_config, family.sub_config) if family.sub_config else hf_config
    architectures = _field(hf_config, "architectures", [family.architecture])
    if family.architecture not in architectures:
        raise UserError(
            f"{model_type} config: architectures={architectures} is not supported by meshlm; "
            f"it converts {family.architecture} (a causal LM with its output head)."
        )
    for key, implemented in family.implemented.items():
        value = _field(c, key, implemented[0])
        if value not in implemented:
            raise UserError(
                f"{model_type} config: {key}={value!r} is not supported by meshlm "
                f"(it implements {' or '.join(map(repr, implemented))})."
            )
    fields = dict(family.style)
    for ours, (theirs, default) in family.names.items():
        fields[ours] = _field(c, theirs, default, family.aliases)
    for ours, (theirs, values) in family.choices.items():
        fields[ours] = values.get(_field(c, theirs, next(iter(values))))
        if fields[ours] is None:
            raise UserError(
                f"{model_type} config: {theirs}={_field(c, theirs)!r} is not one of "
                f"{list(values)}."
            )
    if fields.get("mlp_dim", 0) is None and fields["embed_dim"] is not None:  # GPT-2's n_inner
        fields["mlp_dim"] = 4 * fields["embed_dim"]
    if family.moe and "mlp_dim" not in fields:  # no dense MLP in the model: no other width
        fields["mlp_dim"] = fields["moe_mlp_dim"]
    missing = [theirs for ours, (theirs, _) in family.names.items() if fields[ours] is None]
    if missing:
        raise UserError(f"{model_type} config has no {', '.join(missing)}.")
    if family.style["position_embedding"] == "rope":
        # transformers v5 keeps theta and scaling in rope_parameters (per layer type when the
        # types' bases differ, as ModernBERT's); v4: rope_theta, rope_scaling.
        rope = dict(_field(c, "rope_parameters", None) or _field(c, "rope_scaling", None) or {})
        per_type = rope if rope and all(isinstance(v, dict) for v in rope.values()) else None
        for params in per_type.values() if per_type else [rope]:
            rope_type = params.get("rope_type", params.get("type", "default"))
            if rope_type != "default":
                raise UserError(
                    f"{model_type} config: rope scaling (rope_type={rope_type!r}) is not "
                    "supported by meshlm; it implements plain RoPE with rope_theta."
                )
        global_rope = per_type.get("full_attention", {}) if per_type else rope
        theta = global_rope.get("rope_theta", _field(c, "rope_theta", family.rope_theta))
        fields["rope_theta"] = float(theta)
    if family.read:
        fields.update(family.read(hf_config))
    return ModelConfig(**{**fields, **overrides})


def family_of(config: ModelConfig) -> Family:
    """The HF family a meshlm config belongs to (its `style` fields); UserError if none."""
    mismatches = []
    for family in FAMILIES.values():
        differ = [
            f"model.{k}={getattr(config, k)!r}"
            for k, v in family.style.items()
            if getattr(config, k) != v
        ]
        if family.moe != (config.num_experts > 0):
            differ.append(f"model.num_experts={config.num_experts}")
        if bool(family.sub_config) != (config.encoder_layers > 0):
            differ.append(f"model.encoder_layers={config.encoder_layers}")
        if not differ:
            return family
        needs = ", ".join(f"{k}={v!r}" for k, v in family.style.items())
        needs += ", num_experts > 0" if family.moe else ", num_experts=0"
        needs += ", encoder_layers > 0" if family.sub_config else ", encoder_layers=0"
        mismatches.append(
            f"{family.architecture} needs {needs} (this model has {', '.join(differ)})"
        )
    raise UserError(
        f"This model is in none of the Hugging Face families meshlm exports: "
        f"{'; '.join(mismatches)}."
    )


def config_to_hf(config: ModelConfig, **extra) -> dict:
    """The HF config.json (as a dict) of a meshlm config; `extra` adds keys (e.g. eos_token_id).

    UserError if the HF config cannot express the model (e.g. grouped-query
    attention in GPT-2): it is read back and compared.
    """
    family = family_of(config)
    top = {"architectures": [family.architecture], "model_type": family.model_type}
    hf = {} if family.sub_config else top  # the plain keys' config
    hf.update({key: implemented[0] for key, implemented in family.implemented.items()})
    hf.update({theirs: getattr(config, ours) for ours, (theirs, _) in family.names.items()})
    for ours, (theirs, values) in family.choices.items():
        hf[theirs] = {v: k for k, v in values.items()}[getattr(config, ours)]
    rope = family.style["position_embedding"] == "rope"
    if rope:  # v5 reads rope_parameters; v4 and other tools (vLLM) read rope_theta
        hf["rope_theta"] = config.rope_theta
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if family.write:
        (top if family.sub_config else hf).update(family.write(config, hf))
    if family.sub_config:
        top[family.sub_config] = hf
        hf = top
    hf["dtype"] = config.param_dtype
    hf.update(extra)
    back = config_from_hf(types.SimpleNamespace(**hf))
    unused = {"param_dtype"}  # fields no tensor depends on (config.json has "dtype")
    if not rope:
        unused.add("rope_theta")
    if family.moe and "mlp_dim" not in family.names:  # a MoE family without dense MLPs
        unused.add("mlp_dim")
    lost = [
        f"model.{k}={v!r} (it would read back as {getattr(back, k)!r})"
        for k, v in config.weight_fields().items()
        if k not in unused and getattr(back, k) != v
    ]
    if lost:
        raise UserError(f"A {family.architecture} config cannot express {'; '.join(lost)}.")
    return hf


def _to_numpy(tensor) -> np.ndarray:
    if hasattr(tensor, "detach"):  # torch.Tensor (any dtype, bfloat16 included)
        tensor = tensor.detach().float().cpu().numpy()
    return np.asarray(tensor, dtype=np.float32)


def _from_hf_layout(array: np.ndarray, tensor: Tensor, shape: tuple) -> np.ndarray:
    array = array.T if tensor.transpose else array  # the output axis last
    if tensor.part is not None:
        k, width = tensor.part[0], array.shape[-1] // tensor.part[1]
        array = array[..., k * width : (k + 1) * width]
    return array.reshape(shape)


def _to_hf_layout(array: np.ndarray, tensor: Tensor) -> np.ndarray:
    """The inverse of _from_hf_layout: the HF tensor, or its slice (part) of a packed one."""
    shape = tensor.shape[::-1] if tensor.transpose else tensor.shape  # the output axis last
    if tensor.part is not None:
        shape = shape[:-1] + (shape[-1] // tensor.part[1],)
    array = array.reshape(shape)
    return array.T if tensor.transpose else array


def _part_axis(tensor: Tensor) -> int:
    """The HF axis that a packed tensor's parts are concatenated on: its output axis."""
    return 0 if tensor.transpose else -1


def param_shapes(config: ModelConfig) -> dict:
    """`Transformer(config).init(...)["params"]` as ShapeDtypeStructs; nothing is allocated."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda t: Transformer(config).init(jax.random.key(0), t), tokens)
    return nn.meta.unbox(variables["params"])


class _PerExpert(Mapping):
    """A state dict whose fused expert tensors (transformers 5 in memory, `Fused`) read as
    the per-expert tensors of the family's files, which its table names. Reading is lazy;
    the last fused tensor read is kept, as its experts are asked for one after another."""

    def __init__(self, state_dict, family: Family, num_experts: int):
        self._base, self._last = state_dict, (None, None)
        self._derived = {}  # per-expert name -> (fused name, expert or None, (k, n))
        patterns = [
            (re.compile(re.escape(f.key).replace(r"\{i\}", r"(\d+)")), name, f.part)
            for name, f in family.fused.items()
        ]
        for key in state_dict:
            for pattern, name, part in patterns:
                if match := pattern.fullmatch(key):
                    experts = range(num_experts) if "{j}" in name else [None]
                    for j in experts:
                        self._derived[name.format(i=match[1], j=j)] = (key, j, part)
        self._fused = {key for key, _, _ in self._derived.values()}

    def __getitem__(self, key):
        if key not in self._derived:
            return self._base[key]
        fused, j, (k, n) = self._derived[key]
        if self._last[0] != fused:
            self._last = (fused, self._base[fused])
        array = self._last[1]
        if j is not None:
            if j >= len(array):
                raise UserError(
                    f"{fused!r} holds {len(array)} experts; the model config has more."
                )
            array = array[j]
        rows = array.shape[0] // n
        return array[k * rows : (k + 1) * rows]

    def __contains__(self, key):  # Mapping's default would read the tensor
        return key in self._derived or (key in self._base and key not in self._fused)

    def __iter__(self):
        yield from self._derived
        yield from (key for key in self._base if key not in self._fused)

    def __len__(self):
        return sum(1 for _ in self)


def _layer_indices(tensor: Tensor, config: ModelConfig) -> list[tuple[int, ...]]:
    """The (layer,) or (layer, expert) slices of a stacked parameter that `tensor` names."""
    layers = range(config.encoder_layers if tensor.encoder else config.num_layers)
    if "{j}" in tensor.key:
        return list(itertools.product(layers, range(config.num_experts)))
    return [(i,) for i in layers]


def _key(key: str, index: tuple[int, ...]) -> str:
    return key.format(i=index[0], j=index[-1])


def params_from_hf(state_dict, config: ModelConfig) -> dict:
    """meshlm params (numpy, config.param_dtype) from an HF state dict of `config`'s family:
    the per-expert tensors of the files, or transformers 5's fused ones.

    Reads one HF tensor at a time into preallocated stacked arrays, so a lazy
    `state_dict` never holds more than the params and one tensor in memory.
    """
    family = family_of(config)
    layout = tensor_layout(family, config)
    if layout["token_embed"].key not in state_dict:
        raise UserError(
            f"State dict is not a {family.architecture} checkpoint: it has no "
            f"{layout['token_embed'].key!r}."
        )
    if family.fused:
        state_dict = _PerExpert(state_dict, family, config.num_experts)
    dims = (
        f"vocab_size={config.vocab_size}, num_layers={config.num_layers}, "
        f"embed_dim={config.embed_dim}, num_heads={config.num_heads}, "
        f"kv_heads={config.num_kv_heads}, head_dim={config.head_dim}, mlp_dim={config.mlp_dim}, "
        f"max_seq_len={config.max_seq_len}"
    )
    if config.num_experts:
        dims += f", num_experts={config.num_experts}, moe_mlp_dim={config.moe_mlp_dim}"
    # Exactly the tree, shapes and dtypes the model itself initialises.
    expected = traverse_util.flatten_dict(param_shapes(config), sep="/")
    missing, extra = sorted(set(expected) - set(layout)), sorted(set(layout) - set(expected))
    if missing or extra:
        raise UserError(
            f"{family.model_type} tensors do not match the model config: no tensor for "
            f"{missing}, no parameter for {extra}."
        )

    used = set()

    def load(key, tensor):
        if key not in state_dict:
            raise UserError(
                f"{family.model_type} state dict has no tensor {key!r} (model config: {dims})."
            )
        array = _to_numpy(state_dict[key])
        if array.shape != tensor.shape:
            raise UserError(
                f"{family.model_type} tensor {key!r} has shape {tuple(array.shape)}, expected "
                f"{tensor.shape} for model config {dims}."
            )
        used.add(key)
        return array

    flat = {}
    for path, tensor in layout.items():
        spec = expected[path]
        if "{i}" in tensor.key:
            flat[path] = np.empty(spec.shape, spec.dtype)
            for index in _layer_indices(tensor, config):
                if index[0] < tensor.from_layer:  # HF has no such tensor there: unused ones
                    flat[path][index] = 1.0
                    continue
                array = load(_key(tensor.key, index), tensor)
                flat[path][index] = _from_hf_layout(array, tensor, spec.shape[len(index) :])
        else:
            array = _from_hf_layout(load(tensor.key, tensor), tensor, spec.shape)
            flat[path] = np.ascontiguousarray(array, dtype=spec.dtype)

    if config.tie_embeddings:
        used.add(family.lm_head)  # HF lists the tied output projection under its own name too.
    unused = sorted(k for k in state_dict if k not in used and not IGNORED.search(k))
    if unused:
        raise UserError(
            f"{family.model_type} state dict has {len(unused)} tensor(s) that model config "
            f"({dims}, tie_embeddings={config.tie_embeddings}) has no place for, "
            f"e.g. {unused[:5]}."
        )
    return traverse_util.unflatten_dict(flat, sep="/")


def hf_tensors(params, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """The HF state dict of meshlm params, one `(name, contiguous numpy array)` at a time,
    in the params' dtype, so a writer holds only the params and what it has not yet written.

    A tied model has no "lm_head.weight", as in the files transformers saves.
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    packed = {}  # HF name -> {part index: array}, until every part is there
    for path, tensor in tensor_layout(family_of(config), config).items():
        value = np.asarray(flat[path])
        per_layer = "{i}" in tensor.key
        for index in _layer_indices(tensor, config) if per_layer else [()]:
            if per_layer and index[0] < tensor.from_layer:
                continue
            array = _to_hf_layout(value[index], tensor)
            key = _key(tensor.key, index) if per_layer else tensor.key
            if tensor.part is None:
                yield key, np.ascontiguousarray(array)
                continue
            parts = packed.setdefault(key, {})
            parts[tensor.part[0]] = array
            if len(parts) == tensor.part[1]:
                parts = [parts[k] for k in sorted(parts)]
                yield key, np.ascontiguousarray(np.concatenate(parts, axis=_part_axis(tensor)))
                del packed[key]


def from_hf(hf_model, **overrides) -> tuple[ModelConfig, dict]:
    """`(config, params)` from an HF model instance (e.g. a LlamaForCausalLM)."""
    config = config_from_hf(hf_model.config, **overrides)
    return config, params_from_hf(hf_model.state_dict(), config)


def to_hf(config: ModelConfig, params, **extra) -> tuple[dict, dict]:
    """`(HF config.json dict, HF state dict of numpy arrays)` of a meshlm model; `extra`:
    more config keys (e.g. eos_token_id)."""
    return config_to_hf(config, **extra), dict(hf_tensors(params, config))
