import Foundation

/// Model types by `config.json`'s `model_type`, and the loader of each: the one place that knows
/// which families exist.
public enum ModelRegistry {
    /// The embedded default VLM (committed under models/).
    public static var defaultModelDir: URL { Paths.repoRoot.appendingPathComponent("models/default-vlm") }

    static let loaders: [String: @Sendable (URL) throws -> VisionLanguageModel] = [
        ComposedConfig().modelType: { try ComposedVLM.load($0) },
        "qwen2_5_vl": { try Qwen25VL.load($0) },
        "internvl": { try InternVL.load($0) },
        "internvl_chat": { try InternVL.load($0) },
        "llama": textOnly, "qwen2": textOnly, "mistral": textOnly,
    ]

    @Sendable static func textOnly(_ dir: URL) throws -> VisionLanguageModel { TextOnlyVLM(try LMLoader.load(dir)) }

    private struct ModelType: Decodable {
        var modelType: String?
        enum CodingKeys: String, CodingKey { case modelType = "model_type" }
    }

    /// `load(spec)`, with `chatTemplate` (a Jinja or chat_template.json file), when given, replacing the
    /// checkpoint's own template.
    public static func load(_ spec: String, chatTemplate: URL?) throws -> VisionLanguageModel {
        let vlm = try load(spec)
        if let url = chatTemplate { try useTemplate(url, for: vlm) }
        return vlm
    }

    /// Renders `vlm`'s prompts with the template in `url` (keeping the checkpoint's special tokens).
    public static func useTemplate(_ url: URL, for vlm: VisionLanguageModel) throws {
        guard let m = vlm as? ChatTemplated else {
            throw ModelError("\(url.path): this model does not take a chat template")
        }
        m.chatTemplate = try ChatTemplate.load(url, specialTokens: m.chatTemplate.specialTokens)
    }

    /// `default`, `default-lm`, a GGUF file, or a model directory (its kind read from config.json).
    public static func load(_ spec: String) throws -> VisionLanguageModel {
        if spec == "default-lm" { return TextOnlyVLM(try LMLoader.load(LMLoader.defaultLMPath())) }
        if spec.hasSuffix(".gguf") { return TextOnlyVLM(try LMLoader.load(URL(fileURLWithPath: spec))) }
        let dir = spec == "default" ? defaultModelDir : URL(fileURLWithPath: spec)
        let configURL = dir.appendingPathComponent("config.json")
        guard let data = FileManager.default.contents(atPath: configURL.path) else {
            throw ModelError(
                "\(configURL.path): missing (expected a model directory, a .gguf file, `default` or `default-lm`)")
        }
        let type: String?
        do { type = try JSONDecoder().decode(ModelType.self, from: data).modelType } catch {
            throw ModelError("\(configURL.path): not a JSON object with a model_type (\(error))")
        }
        guard let type, let load = loaders[type] else {
            throw ModelError("\(configURL.path): model_type \(type ?? "(none)") is not supported (\(loaders.keys.sorted()))")
        }
        return try load(dir)
    }
}
