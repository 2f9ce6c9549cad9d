"""Kafka stream processors (rentalml.streaming)."""
