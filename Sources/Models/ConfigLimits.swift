import Foundation

// Bounds for values read from config.json files, far above any released model. Without them a
// corrupt or hostile config fails as a division by zero, or asks libtorch for terabytes while
// building the model, instead of as an error naming the key.

/// JSONSerialization with its error reduced to one line (Foundation refuses nesting past 512).
func parseJSON(_ data: Data) throws -> Any {
    do {
        return try JSONSerialization.jsonObject(with: data)
    } catch {
        let detail = (error as NSError).userInfo[NSDebugDescriptionErrorKey] as? String ?? "\(error)"
        throw ModelError("not valid JSON (\(detail))")
    }
}

enum ConfigLimits {
    static func check(_ key: String, _ value: Int, _ range: ClosedRange<Int>) throws {
        guard range.contains(value) else {
            throw ModelError("\(key) = \(value) is out of range \(range.lowerBound)...\(range.upperBound)")
        }
    }

    static func check(_ key: String, _ value: Double, _ range: ClosedRange<Double>) throws {
        guard value.isFinite, range.contains(value) else {
            throw ModelError("\(key) = \(value) is out of range \(range)")
        }
    }
}

extension LlamaConfig {
    /// Throws a ModelError naming the first implausible value.
    public func validate() throws {
        try ConfigLimits.check("vocab_size", vocabSize, 1...(1 << 22))
        try ConfigLimits.check("hidden_size", hiddenSize, 1...(1 << 16))
        try ConfigLimits.check("intermediate_size", intermediateSize, 1...(1 << 18))
        try ConfigLimits.check("num_hidden_layers", numHiddenLayers, 1...1024)
        try ConfigLimits.check("num_attention_heads", numAttentionHeads, 1...1024)
        try ConfigLimits.check("num_key_value_heads", numKeyValueHeads, 1...numAttentionHeads)
        guard numAttentionHeads % numKeyValueHeads == 0 else {
            throw ModelError("num_attention_heads \(numAttentionHeads) is not a multiple of "
                + "num_key_value_heads \(numKeyValueHeads)")
        }
        if let headDim {
            try ConfigLimits.check("head_dim", headDim, 2...4096)
        } else if hiddenSize % numAttentionHeads != 0 {
            throw ModelError("hidden_size \(hiddenSize) is not a multiple of num_attention_heads \(numAttentionHeads)")
        }
        guard resolvedHeadDim % 2 == 0 else {
            throw ModelError("head dimension \(resolvedHeadDim) is odd (RoPE needs pairs)")
        }
        try ConfigLimits.check("max_position_embeddings", maxPositionEmbeddings, 1...(1 << 24))
        try ConfigLimits.check("rms_norm_eps", rmsNormEps, 0...1)
        try ConfigLimits.check("rope_theta", ropeTheta, 1e-3...1e12)
    }

    /// A lower bound on the decoder's parameter count (no norms, no untied head).
    var minimumParameters: Double {
        let h = Double(hiddenSize), d = Double(resolvedHeadDim)
        let attention = h * d * Double(2 * numAttentionHeads + 2 * numKeyValueHeads)
        let layer = attention + 3 * h * Double(intermediateSize)
        return Double(numHiddenLayers) * layer + Double(vocabSize) * h
    }

    /// Refuses a config implying more parameters than `weightBytes` can hold at `bitsPerParameter`,
    /// before the model is built (which allocates every parameter first).
    func checkFits(weightBytes: Int, bitsPerParameter: Double, file: String) throws {
        let capacity = Double(weightBytes) * 8 / bitsPerParameter + 1_000_000
        guard minimumParameters <= capacity else {
            throw ModelError("\(file): the config implies at least \(Int(minimumParameters)) parameters but the "
                + "weights hold \(weightBytes) bytes (absurd num_hidden_layers / hidden_size / vocab_size?)")
        }
    }
}

extension InternVisionConfig {
    public func validate() throws {
        try ConfigLimits.check("vision_config.hidden_size", hiddenSize, 1...(1 << 14))
        try ConfigLimits.check("vision_config.num_hidden_layers", numHiddenLayers, 1...256)
        try ConfigLimits.check("vision_config.num_attention_heads", numAttentionHeads, 1...256)
        try ConfigLimits.check("vision_config.intermediate_size", intermediateSize, 1...(1 << 16))
        try ConfigLimits.check("vision_config.image_size", imageSize, 1...4096)
        try ConfigLimits.check("vision_config.patch_size", patchSize, 1...imageSize)
        try ConfigLimits.check("vision_config.num_channels", numChannels, 1...4)
        try ConfigLimits.check("vision_config.layer_norm_eps", layerNormEps, 0...1)
    }
}

extension InternVLConfig {
    /// The tile grid search is quadratic in the tile limit (InternVL ships 12).
    static func checkTiling(tileSize: Int, minTiles: Int, maxTiles: Int) throws {
        try ConfigLimits.check("tile size", tileSize, 1...4096)
        try ConfigLimits.check("max tiles", maxTiles, 1...256)
        try ConfigLimits.check("min tiles", minTiles, 1...maxTiles)
    }
}

extension Qwen25VLVisionConfig {
    public func validate(mropeSection: [Int]) throws {
        for s in mropeSection { try ConfigLimits.check("mrope_section entry", s, 0...4096) }
        try ConfigLimits.check("vision_config.depth", depth, 1...256)
        try ConfigLimits.check("vision_config.hidden_size", hiddenSize, 1...(1 << 14))
        try ConfigLimits.check("vision_config.intermediate_size", intermediateSize, 1...(1 << 16))
        try ConfigLimits.check("vision_config.num_heads", numHeads, 1...256)
        try ConfigLimits.check("vision_config.out_hidden_size", outHiddenSize, 1...(1 << 16))
        try ConfigLimits.check("vision_config.in_channels", inChannels, 1...4)
        try ConfigLimits.check("vision_config.patch_size", patchSize, 1...256)
        try ConfigLimits.check("vision_config.temporal_patch_size", temporalPatchSize, 1...16)
        try ConfigLimits.check("vision_config.spatial_merge_size", spatialMergeSize, 1...16)
        try ConfigLimits.check("vision_config.window_size", windowSize, 1...(1 << 16))
        for b in fullAttentionBlocks {
            try ConfigLimits.check("vision_config.fullatt_block_indexes entry", b, 0...(depth - 1))
        }
        try ConfigLimits.check("vision_config.rope_theta", ropeTheta, 1e-3...1e12)
    }
}

extension Qwen25VLImageProcessor {
    public func validate() throws {
        try ConfigLimits.check("patch_size", patchSize, 1...256)
        try ConfigLimits.check("temporal_patch_size", temporalPatchSize, 1...16)
        try ConfigLimits.check("merge_size", mergeSize, 1...16)
        try ConfigLimits.check("min_pixels", minPixels, 1...(1 << 26))
        try ConfigLimits.check("max_pixels", maxPixels, minPixels...(1 << 26))
    }
}

extension ComposedConfig {
    public func validate() throws {
        try ConfigLimits.check("image_size", imageSize, 1...4096)
        try ConfigLimits.check("crop_padding", cropPadding, 0...4096)
        try ConfigLimits.check("projector_hidden", projectorHidden, 1...(1 << 16))
        if let loraRank { try ConfigLimits.check("lora_rank", loraRank, 1...4096) }
        if let loraAlpha { try ConfigLimits.check("lora_alpha", loraAlpha, 1e-6...1e6) }
    }
}

// Decoding entry points shared by the loaders and TTRV.FuzzEntry, so that both report errors
// the same way: naming the file.

extension LlamaConfig {
    public static func decode(_ data: Data, url: URL) throws -> LlamaConfig {
        do {
            return try JSONDecoder().decode(LlamaConfig.self, from: data)
        } catch let e as ModelError {
            throw ModelError("\(url.path): \(e.message)")
        } catch {
            throw ModelError("\(url.path): cannot read a Llama/Qwen2 config (\(error))")
        }
    }
}

extension Qwen25VLConfig {
    public static func decode(_ data: Data, url: URL) throws -> Qwen25VLConfig {
        do { return try Qwen25VLConfig(json: data) } catch { throw ModelError("\(url.path): \(error)") }
    }
}

extension ComposedConfig {
    public static func decode(_ data: Data, url: URL) throws -> ComposedConfig {
        let config: ComposedConfig
        do { config = try JSONDecoder().decode(ComposedConfig.self, from: data) } catch {
            throw ModelError("\(url.path): not a composed VLM config (\(error))")
        }
        do { try config.validate() } catch let e as ModelError { throw ModelError("\(url.path): \(e.message)") }
        return config
    }
}
