"""
The ROS 2 layer: thin nodes over the pure pipelines (the only package importing rclpy).

``lane_seg_node`` (lanes), ``flow_node`` (optical flow), ``camera_sim_node`` (the synthetic
drive published like the CARLA ROS bridge) and ``runner`` (all of them in one process).
"""
