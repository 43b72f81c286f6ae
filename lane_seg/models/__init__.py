"""Models: U-Net family, FlowNetSimple, metadata, quantization and export."""
