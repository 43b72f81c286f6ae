"""
ONNX export with embedded metadata, the ONNX Runtime int8 form, and TensorRT's QDQ rules.

Four artefacts per model:
- ``*_fp32.onnx``: the float model (BatchNorm folded by the exporter in eval mode);
- ``*_int8_qdq.onnx``: explicit quantization for TensorRT: QuantizeLinear/DequantizeLinear
  pairs, int8, zero point 0, per-channel weight scales on axis 0, per-tensor activations;
- ``*_int8_ort.onnx``: the same numbers for ONNX Runtime on x86: activations re-expressed as
  uint8 with zero point 128 (q_u8 = q_s8 + 128, identical values) so that its QDQ fusion runs
  u8s8 integer kernels (VNNI), the form MLAS is fastest with;
- ``*_int8_u8u8.onnx``: the ORT form with the weights as uint8 around 128 too, for x86 CPUs
  without VNNI, where the u8s8 kernels saturate (ONNX Runtime picks the form by CPU).
"""

import json
from pathlib import Path
import warnings

import numpy as np

from .metadata import dumps, METADATA_KEY, sidecar_path, validate, weights_sha256

# Ops TensorRT 10 imports from ONNX that our models use, plus Q/DQ.
TRT_OPS = {'Conv', 'Relu', 'Resize', 'Concat', 'QuantizeLinear', 'DequantizeLinear', 'Identity',
           'Constant', 'Add', 'Mul', 'Sigmoid', 'ConvTranspose', 'MaxPool', 'Clip', 'Slice',
           'Cast', 'Reshape', 'Transpose'}


def export_onnx(model, meta: dict, path, opset: int = 17) -> dict:
    """Export a float or fake-quantized (frozen) torch model; embed and return its metadata."""
    import torch
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec_in = meta['inputs'][0]
    spec_out = meta['outputs'][0]
    model.eval()
    dummy = torch.zeros(*spec_in['shape'])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=opset,
                          input_names=[spec_in['name']], output_names=[spec_out['name']],
                          do_constant_folding=True)
    fold_weight_quantizers(path)
    return embed_metadata(path, meta)


def fold_weight_quantizers(path) -> int:
    """
    Store quantized weights as int8 initializers (DequantizeLinear only), 4x smaller.

    The exporter writes weights as float constants followed by QuantizeLinear; TensorRT and
    ONNX Runtime both accept the folded form (int8 weights -> DequantizeLinear), which holds
    exactly the same values. Returns the number of weights folded.
    """
    import onnx
    from onnx import numpy_helper
    path = Path(path)
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == 'Constant'}
    users = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    folded = []
    for node in graph.node:
        if node.op_type != 'QuantizeLinear' or node.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        scale = _const_value(node.input[1], inits, consts)
        zp = _const_value(node.input[2], inits, consts) if len(node.input) > 2 else None
        if scale is None or zp is None or zp.dtype != np.int8:
            continue
        axis = next((a.i for a in node.attribute if a.name == 'axis'), 1)
        shape = [1] * w.ndim
        if np.ndim(scale) == 1:
            shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)) + zp.astype(np.float32).reshape(
            shape if np.ndim(zp) == 1 else [1] * w.ndim), -128, 127).astype(np.int8)
        name = node.input[0] + '_int8'
        graph.initializer.append(numpy_helper.from_array(q, name))
        folded.append((node, name))
    for node, name in folded:
        for user in graph.node:
            for i, inp in enumerate(user.input):
                if inp == node.output[0]:
                    user.input[i] = name
        weight = node.input[0]
        graph.node.remove(node)
        if users.get(weight, 0) <= 1:
            graph.initializer.remove(inits[weight])
    if folded:
        onnx.save(model, str(path))
    return len(folded)


def embed_metadata(path, meta: dict) -> dict:
    """Write ``meta`` (with the weights' hash) into the ONNX file and its .json sidecar."""
    import onnx
    path = Path(path)
    model = onnx.load(str(path))
    blobs = [onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer]
    meta = dict(meta, weights_sha256=weights_sha256(blobs))
    validate(meta, path)
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = dumps(meta)
    onnx.save(model, str(path))
    sidecar_path(path).write_text(json.dumps(meta, indent=2, sort_keys=True) + '\n')
    return meta


def to_ort_int8(qdq_path, out_path):
    """
    Re-express activation Q/DQ pairs for ONNX Runtime's integer kernels; same scales.

    Non-negative tensors (after ReLU, and their up-sampling and concatenation) become uint8
    with zero point 0: the ReLU before them is then redundant, ORT drops it and fuses
    DQ -> Conv -> Q into one QLinearConv (u8 activations x s8 weights, VNNI). Signed tensors
    (the normalized input) become uint8 with zero point 128 (q_u8 = q_s8 + 128). Weights stay
    int8 per channel. Inside the calibrated range the values are identical to the TensorRT
    model's; above it the uint8 form saturates at 255 steps instead of 127.
    """
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(qdq_path))
    graph = model.graph
    producers = {out: n for n in graph.node for out in n.output}
    constant_names = ({t.name for t in graph.initializer}
                      | {n.output[0] for n in graph.node if n.op_type == 'Constant'})
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def non_negative(name, depth=0):
        node = producers.get(name)
        if node is None or depth > 16:
            return False
        if node.op_type == 'Relu':
            return True
        if node.op_type in ('Resize', 'DequantizeLinear', 'QuantizeLinear', 'Identity',
                            'MaxPool', 'Clip'):
            return non_negative(node.input[0], depth + 1)
        if node.op_type == 'Concat':
            return all(non_negative(i, depth + 1) for i in node.input)
        return False

    zero_points = {'u8_0': np.array(0, np.uint8), 'u8_128': np.array(128, np.uint8)}
    for key, value in zero_points.items():
        graph.initializer.append(numpy_helper.from_array(value, f'lane_seg_zp_{key}'))
    changed = 0
    for node in graph.node:
        if node.op_type != 'QuantizeLinear' or node.input[0] in constant_names:
            continue
        zp = 'lane_seg_zp_u8_0' if non_negative(node.input[0]) else 'lane_seg_zp_u8_128'
        node.input[2] = zp
        for dq in consumers.get(node.output[0], []):
            if dq.op_type == 'DequantizeLinear':
                dq.input[2] = zp
        changed += 1
    if changed == 0:
        raise ValueError(f'{qdq_path}: no activation QuantizeLinear to convert')
    onnx.save(model, str(out_path))
    meta = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
    meta['quantization'] = dict(meta['quantization'], ort_activation_type='uint8')
    return embed_metadata(out_path, meta)


def to_u8u8(ort_path, out_path):
    """
    Re-express the int8 weights of an ONNX Runtime int8 model as uint8 around zero point 128.

    w_u8 = w_s8 + 128 with zero point 128: the dequantized weights are identical, and ONNX
    Runtime runs its u8u8 kernels, exact on x86 CPUs without VNNI where the u8s8 ones
    saturate (see :mod:`lane_seg.engines.int8_kernels`). Activations stay as they are.
    """
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(ort_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == 'Constant'}
    converted = {}   # weight name -> its uint8 zero point (a weight may feed several DQs)
    changed = 0
    for node in graph.node:
        if node.op_type != 'DequantizeLinear' or node.input[0] not in inits:
            continue
        if node.input[0] in converted:
            del node.input[2:]
            node.input.append(converted[node.input[0]])
            continue
        weights = numpy_helper.to_array(inits[node.input[0]])
        if weights.dtype != np.int8:
            continue
        scale = _const_value(node.input[1], inits, consts)
        zero = (_const_value(node.input[2], inits, consts) if len(node.input) > 2
                else np.zeros((), np.int8))
        if scale is None or zero is None or np.any(zero != 0):
            raise ValueError(f'{ort_path}: weights {node.input[0]} are not symmetric int8 '
                             'with constant scales')
        shifted = (weights.astype(np.int16) + 128).astype(np.uint8)
        inits[node.input[0]].CopyFrom(numpy_helper.from_array(shifted, node.input[0]))
        zp_name = f'{node.input[0]}_lane_seg_zp_u8'
        graph.initializer.append(numpy_helper.from_array(
            np.full(np.shape(scale), 128, np.uint8), zp_name))
        del node.input[2:]
        node.input.append(zp_name)
        converted[node.input[0]] = zp_name
        changed += 1
    if changed == 0:
        raise ValueError(f'{ort_path}: no int8 weights to convert')
    onnx.save(model, str(out_path))
    meta = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
    # the twin names its source, so that an engine never pairs it with another model
    meta['quantization'] = dict(meta['quantization'], ort_weight_type='uint8',
                                u8u8_of_weights_sha256=meta.get('weights_sha256'))
    return embed_metadata(out_path, meta)


def _const_value(name, inits, consts):
    from onnx import numpy_helper
    if name in inits:
        return numpy_helper.to_array(inits[name])
    if name in consts:
        for attr in consts[name].attribute:
            if attr.name == 'value':
                return numpy_helper.to_array(attr.t)
    return None


def check_tensorrt_qdq(path) -> list:
    """
    Problems that would stop TensorRT's explicit quantization (empty list: the graph is fine).

    Rules: opset >= 13; every QuantizeLinear/DequantizeLinear has an int8 zero point equal to
    0 (symmetric) and positive finite scales; per-channel scales only on axis 0 of weights;
    every op is one TensorRT imports; at least one Q/DQ pair (it is a quantized model).
    """
    import onnx
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == 'Constant'}
    problems = []
    opset = max((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')),
                default=0)
    if opset < 13:
        problems.append(f'opset {opset} < 13 (per-channel Q/DQ needs 13)')
    qdq = 0
    for node in graph.node:
        if node.op_type not in TRT_OPS:
            problems.append(f'{node.name or node.op_type}: op {node.op_type} not supported')
        if node.op_type not in ('QuantizeLinear', 'DequantizeLinear'):
            continue
        qdq += 1
        label = node.name or node.output[0]
        scale = _const_value(node.input[1], inits, consts)
        if scale is None or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            problems.append(f'{label}: scale missing, non-finite or not positive')
        if len(node.input) < 3 or not node.input[2]:
            problems.append(f'{label}: no zero point (defaults to uint8, TensorRT needs int8)')
            continue
        zp = _const_value(node.input[2], inits, consts)
        if zp is None:
            problems.append(f'{label}: zero point is not a constant')
        elif zp.dtype != np.int8:
            problems.append(f'{label}: zero point type {zp.dtype} is not int8')
        elif np.any(zp != 0):
            problems.append(f'{label}: zero point {zp.tolist()} is not 0 (asymmetric)')
        axis = next((a.i for a in node.attribute if a.name == 'axis'), 1)
        if scale is not None and np.ndim(scale) == 1 and axis != 0:
            problems.append(f'{label}: per-channel scale on axis {axis}, TensorRT needs 0')
    if qdq == 0:
        problems.append('no QuantizeLinear/DequantizeLinear: not an explicitly quantized model')
    return problems
