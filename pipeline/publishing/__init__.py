"""Publishing: a Hugging Face dataset folder with embedded images
(:mod:`~pipeline.publishing.publish`, sorted size-capped shards from
:mod:`~pipeline.publishing.sharding`), exports for other trainers
(:mod:`~pipeline.publishing.exports`) and the data card (:mod:`~pipeline.publishing.cards`,
template ``templates/data_card.md.j2``)."""
