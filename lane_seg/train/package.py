"""
``lane-seg export TASK``: turn trained checkpoints into the shipped artefacts.

From a float checkpoint and a fake-quantized 8-bit one (PTQ or QAT) it writes, into OUT:
``NAME_fp32.onnx``, ``NAME_int8_qdq.onnx`` (TensorRT explicit quantization; checked against
TensorRT's Q/DQ rules), ``NAME_int8_ort.onnx`` (ONNX Runtime's fastest integer form, u8s8),
``NAME_int8_u8u8.onnx`` (the same numbers, exact on x86 CPUs without VNNI), the two
checkpoints as ``NAME_fp32.safetensors`` / ``NAME_int8.safetensors`` (for the torch backend),
and a ``.json`` metadata file beside every artefact.
"""

import json
from pathlib import Path
import shutil


def export_models(float_ckpt, int8_ckpt, out, name, extra_metrics=None) -> dict:
    """Write all artefacts; returns {artefact: path}. Raises ValueError on rule violations."""
    from ..models import checkpoint
    from ..models.export import check_tensorrt_qdq, export_onnx, to_ort_int8, to_u8u8
    from ..models.quant import freeze_for_export
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for precision, src in (('fp32', float_ckpt), ('int8', int8_ckpt)):
        model, meta = checkpoint.load_model(src)
        if (precision == 'int8') != bool(meta['architecture'].get('quant')):
            raise ValueError(f'{src}: expected a {precision} checkpoint')
        ckpt = out / f'{name}_{precision}_torch.safetensors'
        shutil.copyfile(src, ckpt)
        meta = dict(meta, name=f'{name}_{precision}', checkpoint=ckpt.name)
        meta.pop('kind', None)
        if extra_metrics:
            meta['metrics'] = dict(meta.get('metrics', {}), **extra_metrics.get(precision, {}))
        ckpt.with_suffix('.json').write_text(json.dumps(meta, indent=2, sort_keys=True) + '\n')
        written[f'{precision}_checkpoint'] = ckpt
        if precision == 'fp32':
            path = out / f'{name}_fp32.onnx'
            export_onnx(model, meta, path)
            written['fp32_onnx'] = path
        else:
            qdq = out / f'{name}_int8_qdq.onnx'
            if meta.get('quantization', {}).get('layer_bits'):
                from ..models.bitwidth import export_learned
                export_learned(model, meta, qdq)   # learned widths: int8 containers
            else:
                freeze_for_export(model)
                export_onnx(model, meta, qdq)
            problems = check_tensorrt_qdq(qdq)
            if problems:
                raise ValueError(f'{qdq} breaks TensorRT Q/DQ rules: ' + '; '.join(problems))
            written['int8_qdq_onnx'] = qdq
            ort_path = out / f'{name}_int8_ort.onnx'
            to_ort_int8(qdq, ort_path)
            written['int8_ort_onnx'] = ort_path
            u8u8_path = out / f'{name}_int8_u8u8.onnx'
            to_u8u8(ort_path, u8u8_path)
            written['int8_u8u8_onnx'] = u8u8_path
    return {k: str(v) for k, v in written.items()}
