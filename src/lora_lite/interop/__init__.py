"""Converters to and from the peft adapter format."""
