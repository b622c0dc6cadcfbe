package example.inventory;

import java.io.IOException;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;

/** Values are JSON texts in UTF-8 (docs/protocol.md section 3.2); an empty value is not JSON. */
final class Json {
    static final ObjectMapper MAPPER = new ObjectMapper();

    private Json() {}

    static JsonNode parse(byte[] value) throws Wire.Refused {
        if (value == null || value.length == 0) {
            throw Wire.Refused.malformed("value", "empty (content must be null or {})");
        }
        try {
            JsonNode node = MAPPER.readTree(value);
            if (node == null || node.isMissingNode()) {
                throw Wire.Refused.malformed("value", "not JSON");
            }
            return node;
        } catch (IOException e) {
            throw Wire.Refused.malformed("value", "invalid JSON (" + e.getMessage().lines().findFirst().orElse("") + ")");
        }
    }

    static byte[] bytes(JsonNode node) {
        try {
            return MAPPER.writeValueAsBytes(node);
        } catch (IOException e) {
            throw new IllegalStateException(e);
        }
    }

    static ObjectNode object() {
        return MAPPER.createObjectNode();
    }

    static byte[] error(String message) {
        return bytes(object().put("error", message));
    }
}
