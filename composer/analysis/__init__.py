"""Looking inside a library and a composition: CMLoRA's frequency analysis of each adapter (:mod:`.frequency`) and
the pictures of a composition — retrieval scores, weight tables, gates (:mod:`.plots`)."""
