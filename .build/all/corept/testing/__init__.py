"""corept's conformance kit: the checks every architecture plugin runs against the HF reference."""
