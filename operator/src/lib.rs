//! tidepool's operator: reconciles ConnectionPools into per-node settings.
