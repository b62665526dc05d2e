"""monitor: drift, online quality from delayed labels, alerts, retraining and the A/B decision."""
