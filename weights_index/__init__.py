"""Floor 2: adapter files on disk → canonical adapters; metadata; SQLite catalog; FAISS vector store."""
