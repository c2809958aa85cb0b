"""Link between the JEE1 UI firmware and the engine (serial / Unix socket); built by its own issue."""
