"""Generated from proto/megaflow/v1 by scripts/gen_proto.py. Do not edit."""
