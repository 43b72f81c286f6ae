"""Pure pre- and post-processing around the engines (no rclpy, no torch)."""
