"""Network blocks that pipeline modules add to the backbone (BiLSTM context, class tokens, memory)."""
