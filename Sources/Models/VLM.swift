import Foundation
import Torch

/// A prompt ready for the decoder: token embeddings with image features spliced in.
public struct PreparedPrompt {
    /// [1, T, hidden]
    public var embeddings: Tensor
    /// RoPE positions: [1, T] for 1-D RoPE, [3, 1, T] for multimodal RoPE (Qwen2.5-VL).
    public var positions: Tensor
    /// Position of the first generated token (T for 1-D RoPE; max(positions)+1 for M-RoPE).
    public var nextPosition: Int
    /// The prompt's token ids (image placeholders expanded), for logging and training masks.
    public var tokenIds: [Int]

    public init(embeddings: Tensor, positions: Tensor, nextPosition: Int, tokenIds: [Int]) {
        self.embeddings = embeddings
        self.positions = positions
        self.nextPosition = nextPosition
        self.tokenIds = tokenIds
    }
}

/// What eval, adapt and generate need from a vision-language model.
public protocol VisionLanguageModel: AnyObject {
    /// The decoder (its `forward` accepts `PreparedPrompt.positions` and [B, T] decode positions).
    var lm: CausalLM { get }
    var tokenizer: Tokenizer { get }
    /// Token ids that end a reply.
    var stopIds: Set<Int> { get }
    /// The whole network, for parameter names, freezing, LoRA and checkpoints.
    var module: Module { get }
    /// Builds the prompt for one user turn. `text` holds the image placeholder "<image>" where
    /// the image goes (prepended when absent and an image is given).
    func prepare(text: String, image: Image?, system: String?) throws -> PreparedPrompt
}
