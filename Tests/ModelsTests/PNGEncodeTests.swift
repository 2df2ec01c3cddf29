import Foundation
import XCTest

import Models

final class PNGEncodeTests: XCTestCase {
    /// libpng (the decoder) checks every chunk's CRC and the zlib stream, so a round trip
    /// tests the encoder against an independent implementation.
    func testGrayAndRGBRoundTripThroughLibpng() throws {
        var state: UInt32 = 12345
        func next() -> UInt8 {
            state = state &* 1_103_515_245 &+ 12345
            return UInt8(state >> 24)
        }
        for (w, h, c) in [(28, 28, 1), (7, 5, 3), (1, 1, 1), (33, 2, 3)] {
            let img = Image(width: w, height: h, channels: c, pixels: (0..<(w * h * c)).map { _ in next() })
            let png = try XCTUnwrap(img.pngData())
            XCTAssertEqual(try Image.decode(png, name: "encoded \(w)x\(h)x\(c)"), img)
        }
    }

    func testChunkLayoutByHand() throws {
        let png = try XCTUnwrap(Image(width: 2, height: 3, channels: 3, pixels: Array(repeating: 9, count: 18)).pngData())
        let bytes = [UInt8](png)
        XCTAssertEqual(Array(bytes[0..<8]), [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A])
        // IHDR: length 13, "IHDR", width 2, height 3, depth 8, colour type 2 (RGB), 0, 0, 0.
        XCTAssertEqual(Array(bytes[8..<29]), [0, 0, 0, 13, 0x49, 0x48, 0x44, 0x52, 0, 0, 0, 2, 0, 0, 0, 3, 8, 2, 0, 0, 0])
        // IEND is always the same 12 bytes (its CRC-32 is AE 42 60 82).
        XCTAssertEqual(Array(bytes.suffix(12)), [0, 0, 0, 0, 0x49, 0x45, 0x4E, 0x44, 0xAE, 0x42, 0x60, 0x82])
    }

    func testThumbnailKeepsAspectAndNeverEnlarges() {
        let img = Image(width: 100, height: 50, channels: 1, pixels: Array(repeating: 7, count: 5000))
        let t = img.thumbnail(maxSide: 48)
        XCTAssertEqual([t.width, t.height], [48, 24])
        XCTAssertEqual(t.pixels.allSatisfy { $0 == 7 }, true)
        XCTAssertEqual(img.thumbnail(maxSide: 200), img)
    }
}
