"""The torch side: lowering, the frontend, distillation."""
