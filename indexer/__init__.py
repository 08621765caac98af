"""The offline indexer: encodes a gallery and captions into versioned FAISS indexes.

``indexer.store`` is the on-disk format and its read-only view (the service reads indexes
only through it); ``indexer.build`` runs a build; ``indexer.cli`` is the command line.
``indexer.metadata`` types, stores and filters the gallery's metadata fields;
``indexer.selection`` restricts a faiss search to the rows a filter selects.
"""
