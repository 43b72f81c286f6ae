"""
Integer-deployment memory footprint of the shipped int8 models (MCU/FPGA sizing tables).

Run from the repository root: ``.venv/bin/python docs/scripts/footprint.py``; prints Markdown.
"""

from lane_seg.models import checkpoint
from lane_seg.models.bitwidth import footprint_table, format_footprint


def main():
    for name in ('lane_unet_int8_torch', 'flow_int8_torch'):
        model, meta = checkpoint.load_model(f'models/{name}.safetensors')
        shape = [1] + list(meta['inputs'][0]['shape'][1:])
        print(f'### {name} ({shape[2]}x{shape[3]} input, 8-bit camera frame)\n')
        print(format_footprint(footprint_table(model, shape, input_bits=8)))


if __name__ == '__main__':
    main()
