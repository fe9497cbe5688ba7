"""Fleet and gateway configs shipped with pdgate (package data: ``pdgate up`` runs ``default.yaml``)."""
