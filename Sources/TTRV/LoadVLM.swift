import Foundation
import Models

public enum VLMLoader {
    /// The embedded default VLM (committed under models/).
    public static var defaultModelDir: URL { Paths.repoRoot.appendingPathComponent("models/default-vlm") }

    /// `default` or a model directory (the kind is read from its config.json); `chatTemplate`, a Jinja
    /// or chat_template.json file, replaces the checkpoint's own template.
    public static func load(_ spec: String, chatTemplate: URL?) throws -> VisionLanguageModel {
        let vlm = try load(spec)
        if let url = chatTemplate { try useTemplate(url, for: vlm) }
        return vlm
    }

    /// Renders `vlm`'s prompts with the template in `url` (keeping the checkpoint's special tokens).
    public static func useTemplate(_ url: URL, for vlm: VisionLanguageModel) throws {
        guard let m = vlm as? ChatTemplated else {
            throw DatasetError(message: "\(url.path): this model does not take a chat template")
        }
        m.chatTemplate = try ChatTemplate.load(url, specialTokens: m.chatTemplate.specialTokens)
    }

    /// `default` or a model directory; the kind is read from its config.json.
    public static func load(_ spec: String) throws -> VisionLanguageModel {
        if spec == "default-lm" { return TextOnlyVLM(try LMLoader.load(LMLoader.defaultLMPath())) }
        if spec.hasSuffix(".gguf") { return TextOnlyVLM(try LMLoader.load(URL(fileURLWithPath: spec))) }
        let dir = spec == "default" ? defaultModelDir : URL(fileURLWithPath: spec)
        let configURL = dir.appendingPathComponent("config.json")
        guard let data = try? Data(contentsOf: configURL) else {
            throw DatasetError(message: "\(configURL.path): missing (expected a model directory or `default`)")
        }
        let type = (try? JSONSerialization.jsonObject(with: data) as? [String: Any])?["model_type"] as? String
        switch type {
        case "ttrv-composed": return try ComposedVLM.load(dir)
        case "qwen2_5_vl": return try Qwen25VL.load(dir)
        case "internvl", "internvl_chat": return try InternVL.load(dir)
        case "llama", "qwen2", "mistral": return TextOnlyVLM(try LMLoader.load(dir))
        default:
            throw DatasetError(message: "\(configURL.path): model_type \(type ?? "(none)") is not a supported VLM (ttrv-composed, qwen2_5_vl, internvl, internvl_chat)")
        }
    }
}
