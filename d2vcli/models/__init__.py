"""data2vec networks: `encoder` (the modality-neutral transformer) and one file per modality's
front end and heads (`audio`). These files import only torch."""
