"""rclpy nodes of lapa-ros: the simulated arm (``lapa_sim_arm``), and later the recorder and the policy server."""
