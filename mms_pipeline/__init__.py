"""M&Ms-1 multi-vendor cardiac MRI pipeline: LV / MYO / RV segmentation (and optional pathology classification)
with scanner vendors (or centres) as groups."""
