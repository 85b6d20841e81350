"""The real local stack on 127.0.0.1: Kafka (KRaft), SeaweedFS S3, Redis, PostgreSQL."""
